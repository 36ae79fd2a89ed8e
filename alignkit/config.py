"""Config dataclasses shared by every algorithm, and the ``arg`` helper that documents a field once.

Each algorithm has one config dataclass composed of these parts plus its own fields; the CLI turns the fields
into flags (``--max-length``) and YAML keys (``max_length``) with the help text given here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Check = Callable[[Any], "str | None"]  # value -> what was expected when the value is wrong, else None


def arg(default: Any, help: str, choices: tuple | None = None, check: Check | None = None) -> Any:
    """A dataclass field with its one-line documentation (shown by ``--help``) and what values it accepts:
    ``choices`` (a tuple) and/or a ``check`` (e.g. ``at_least(1)``), enforced by ``validate`` at start-up."""
    metadata = {"help": help, "choices": choices, "check": check}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------- option checks


class OptionError(ValueError):
    """A bad option value: ``name`` is the config field, the message says what was expected."""

    def __init__(self, name: str, value: Any, expected: str):
        self.name, self.value, self.expected = name, value, expected
        super().__init__(self.describe("--" + name.replace("_", "-")))

    def describe(self, where: str) -> str:
        """One line naming the option as the user gave it: ``--batch-size 0: ...`` or ``run.yaml: batch_size 0: ...``."""
        shown = repr(self.value) if isinstance(self.value, str) else self.value
        return f"{where} {shown}: {self.expected}"


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"expected a value >= {low}"  # NaN fails every comparison


def above(low: float) -> Check:
    return lambda v: None if v > low else f"expected a value > {low}"


def between(low: float, high: float, high_open: bool = False) -> Check:
    def check(v):
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok else f"expected a value in [{low}, {high}{')' if high_open else ']'}"

    return check


def model_location(value: str) -> str | None:
    """A bundled name, a local model/run directory, or a hub id ``org/name``. A value that looks like a path (starts
    with / . ~, has more than one /, or exists) must be a directory holding a model; a hub id is left to the loader."""
    if not value:
        return None
    from alignkit.models import BUNDLED_MODELS

    if value in BUNDLED_MODELS:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        found = [n for n in ("config.json", "adapter_config.json", "final") if (path / n).exists()]
        if found or any(path.glob("checkpoint-*")):
            return None
        return "not a model directory (no config.json, adapter_config.json, final/ or checkpoint-N/ in it)"
    if path.exists():
        return "expected a model directory, this is a file"
    # "runs/sft" is a path when ./runs exists, whatever a hub id would look like
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") != 1 or "\\" in value or path.parent.is_dir()
    if looks_local:
        names = ", ".join(BUNDLED_MODELS)
        return f"no such directory (expected a bundled model ({names}), a local directory or a hub id org/name)"
    return None


def data_source(value: str) -> str | None:
    """A data file or directory that exists, or a bundled dataset name; a text file must hold UTF-8 text."""
    if not value or not isinstance(value, str):
        return None
    if value.startswith("bundled:"):
        from alignkit.bundled import bundled_path

        try:
            bundled_path(value[len("bundled:") :])
        except ValueError as e:
            return str(e)
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return "no such file or directory"
    from alignkit.data.records import TEXT_SUFFIXES, text_file_problem

    return text_file_problem(path) if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES else None


def need_data(data: DataConfig) -> None:
    """Trainers on a fixed dataset have no default one."""
    if not data.data:
        raise OptionError("data", data.data, "expected training data: a .jsonl/.json/.parquet/.csv file, a saved datasets "
                          "directory or bundled:NAME")


def validate(cfg: Any) -> None:
    """Check every option of a (nested) config against its field's ``choices``/``check``, then the config's own
    cross-option ``check()`` when it has one. Raises ``OptionError`` for the first bad value. Call it before
    anything is loaded or written."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
            continue
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise OptionError(f.name, value, f"expected one of {', '.join(map(str, choices))}")
        problem = check(value) if check is not None else None
        if problem:
            raise OptionError(f.name, value, problem)
    if hasattr(cfg, "check"):
        cfg.check()


def checked(entry: Callable) -> Callable:
    """Decorator for a command's entry function: ``validate`` its config first, so ``train(cfg)`` called from
    Python gives the same one-line errors as the CLI, before anything is loaded or written."""

    @functools.wraps(entry)
    def run_checked(cfg, *args, **kwargs):
        validate(cfg)
        return entry(cfg, *args, **kwargs)

    return run_checked


def world_size() -> int:
    """Processes of this run as the launcher (torchrun, accelerate) announces them, before any set-up."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ModelConfig:
    model: str = arg("smollm2-135m", "policy: bundled name, hub id, local path or alignkit run dir", check=model_location)
    lora: bool = arg(False, "train a LoRA adapter instead of all weights")
    lora_r: int = arg(16, "LoRA rank", check=at_least(1))
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r)", check=above(0))
    lora_dropout: float = arg(0.0, "LoRA dropout", check=between(0, 1, high_open=True))
    lora_targets: str = arg("all-linear", "modules LoRA wraps: all-linear or comma-separated names")
    trust_remote_code: bool = arg(False, "allow custom model code from the hub")

    def lora_settings(self, seed: int | None = None):
        """The adapter to add (None without --lora); ``seed`` (the run's) fixes its initial weights."""
        from alignkit.models import LoraSettings

        if not self.lora:
            return None
        targets = self.lora_targets if self.lora_targets == "all-linear" else tuple(self.lora_targets.split(","))
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets, seed)


@dataclass
class DataConfig:
    data: str = arg("", "training data: .jsonl/.json/.parquet/.csv, a saved datasets dir, or bundled:NAME",
                    check=data_source)
    eval_data: str = arg("", "held-out data (same shapes); empty: no evaluation", check=data_source)
    max_length: int = arg(1024, "longest example in tokens; longer ones are errors (or skipped)", check=at_least(1))
    skip_invalid: bool = arg(False, "skip invalid records and report how many and why, instead of stopping")
