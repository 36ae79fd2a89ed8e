"""Config dataclasses shared by every algorithm, and the ``arg`` helper that documents a field once.

Each algorithm has one config dataclass composed of these parts plus its own fields; the CLI turns the fields
into flags (``--max-length``) and YAML keys (``max_length``) with the help text given here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def arg(default: Any, help: str) -> Any:
    """A dataclass field with its one-line documentation (shown by ``--help``)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    model: str = arg("smollm2-135m", "policy: bundled name, hub id, local path or alignkit run dir")
    lora: bool = arg(False, "train a LoRA adapter instead of all weights")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = arg(0.0, "LoRA dropout")
    lora_targets: str = arg("all-linear", "modules LoRA wraps: all-linear or comma-separated names")
    trust_remote_code: bool = arg(False, "allow custom model code from the hub")

    def lora_settings(self):
        from alignkit.models import LoraSettings

        if not self.lora:
            return None
        targets = self.lora_targets if self.lora_targets == "all-linear" else tuple(self.lora_targets.split(","))
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets)


@dataclass
class DataConfig:
    data: str = arg("", "training data: .jsonl/.json/.parquet/.csv, a saved datasets dir, or bundled:NAME")
    eval_data: str = arg("", "held-out data (same shapes); empty: no evaluation")
    max_length: int = arg(1024, "longest example in tokens; longer ones are errors (or skipped)")
    skip_invalid: bool = arg(False, "skip invalid records and report how many and why, instead of stopping")
