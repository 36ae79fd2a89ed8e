"""Run a resolved recipe stage by stage: skip what is unchanged, resume what was killed, redo what changed.

RUN/stages.json lists what the last invocation did with each stage (ran, resumed, skipped) and how long it took.
Per stage, in RUN/<stage>/:
- ``.started`` holds the stage hash when it starts, ``.done`` when it finished (written last, atomically);
- ``.done`` == current hash: skipped;
- no ``.done``, ``.started`` == current hash and a ``checkpoint-N/``: resumed (``--resume``), its metrics.jsonl cut
  back to the checkpoint's step so no step is logged twice;
- anything else: the directory is cleared and the stage runs from scratch.
Downstream stages include upstream hashes in theirs, so a changed stage re-runs everything that reads it.

Stages run in this process (``alignkit.cli.build_config`` + the command's entry function): torch, transformers
and the bundled model are imported and converted once instead of once per stage (several seconds each on a
small CPU), and one progress display covers the run. The engine resets accelerate's process-global state per
run, every stage seeds itself from its config, and the global RNGs are reset before each stage, so a stage
computes the same thing whatever ran before it.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from alignkit.pipeline.commands import OUTPUTS, command_spec
from alignkit.pipeline.hashing import stage_hash
from alignkit.pipeline.recipe import Recipe, Stage, as_dict, check_builds, full_config, validated


@dataclass
class StageResult:
    name: str
    status: str  # "skipped" | "ran" | "resumed"
    seconds: float
    hash: str


def hashes_of(recipe: Recipe) -> dict[str, str]:
    out: dict[str, str] = {}
    for stage in recipe.stages:
        out[stage.name] = stage_hash(stage.command, stage.options, {n: out[n] for n in stage.needs})
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _checkpoint_step(stage_dir: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(steps) if steps else None


def _trim_metrics(stage_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records logged after the checkpoint a killed stage resumes from (they are redone)."""
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    _write_atomic(path, "".join(kept))


class _Tee(io.TextIOBase):
    """Writes to the terminal stream and the stage's log file (progress bars included)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if self.stream is not None:
            self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return bool(self.stream is not None and self.stream.isatty())


@contextmanager
def _logged(path: Path, echo: bool):
    with path.open("a") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out if echo else None, log), _Tee(err if echo else None, log)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = out, err


def _reset_rngs() -> None:
    """The same global RNG state at the start of every stage: whatever ran before it in this process (or in a
    killed one), a stage draws the same random numbers, e.g. for a LoRA adapter initialised before the trainer
    seeds itself."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def run_stage(recipe: Recipe, stage: Stage, digest: str, echo: bool = True) -> str:
    """Run (or resume) one stage; returns "ran" or "resumed"."""
    from alignkit.data import DataError
    from alignkit.engine import TrainingDiverged

    resume = False
    if stage.dir.exists():
        step = _checkpoint_step(stage.dir) if OUTPUTS[stage.command].checkpoints else None
        if _read(stage.dir / ".started") == digest and step is not None and not (stage.dir / ".done").exists():
            resume = True
            _trim_metrics(stage.dir, step)
        else:
            shutil.rmtree(stage.dir)
    stage.dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(stage.dir / ".started", digest)
    module, _, entry = command_spec(stage.command)
    config = validated(stage, full_config(stage, recipe.source, resume=resume), recipe.source)
    _reset_rngs()
    log = stage.dir / "log.txt"
    with _logged(log, echo):
        try:
            getattr(importlib.import_module(module), entry)(config)
        except (DataError, TrainingDiverged, FileNotFoundError, ValueError) as e:
            raise ValueError(f"{recipe.source}: stage {stage.name} ({stage.command}) failed: {e} (log: {log})") from e
        except BaseException:
            traceback.print_exc()
            raise
    _write_atomic(stage.dir / ".done", digest)
    return "resumed" if resume else "ran"


def run(recipe: Recipe, echo: bool = True) -> list[StageResult]:
    """Run every stage in order; a progress line per stage on stderr, each stage's output in RUN/<stage>/log.txt."""
    check_builds(recipe)
    digests = hashes_of(recipe)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(recipe.run_dir / "recipe.resolved.yaml", yaml.safe_dump(as_dict(recipe, digests), sort_keys=False))
    results = []
    total = len(recipe.stages)
    started = time.time()
    for i, stage in enumerate(recipe.stages, 1):
        head = f"[{i}/{total}] {stage.name}" + (f" ({stage.command})" if stage.command != stage.name else "")
        if _read(stage.dir / ".done") == digests[stage.name]:
            print(f"{head}: unchanged, skipped", file=sys.stderr, flush=True)
            results.append(StageResult(stage.name, "skipped", 0.0, digests[stage.name]))
            continue
        print(f"{head}: running (log {stage.dir / 'log.txt'}) — {time.time() - started:.0f} s into the run",
              file=sys.stderr, flush=True)
        t0 = time.time()
        status = run_stage(recipe, stage, digests[stage.name], echo)
        results.append(StageResult(stage.name, status, time.time() - t0, digests[stage.name]))
        print(f"{head}: {'resumed and finished' if status == 'resumed' else 'done'} in {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
    print(f"run finished in {time.time() - started:.0f} s: {recipe.run_dir}", file=sys.stderr, flush=True)
    _write_atomic(recipe.run_dir / "stages.json", json.dumps([asdict(r) for r in results], indent=2))
    return results
