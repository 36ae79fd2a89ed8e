"""Find what a report shows in run directories: the files the commands wrote, read back.

- ``metrics.jsonl`` (every trainer): training curves, one record per logged step (a resumed run's repeated steps
  keep their last record);
- evaluate JSON (``{"model", "reward", "reward/mean", "kl", "distinct-2", ...}``) and its ``*.samples.jsonl``;
- best-of-N ``bon.jsonl`` (N scored responses per prompt): best-of-k for every k <= N from the same samples;
- judge verdicts, ``*verdicts.jsonl``: one record per comparison of a candidate with a baseline response,
  ``{"win": P(candidate better) in [0, 1], "candidate": text, "baseline": text, "method": name (optional)}``.
A pipeline run's ``recipe.resolved.yaml`` names each stage's command, so a model path inside the run is labelled
by the stage (and method) that trained it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Curve:
    label: str  # run/stage
    records: list[dict]


@dataclass
class Evaluation:
    label: str
    method: str  # the command that trained the evaluated model, "base" for an untrained one
    metrics: dict
    samples: list[dict] = field(default_factory=list)

    @property
    def reward(self) -> float:
        return float(self.metrics["reward/mean"])

    @property
    def reward_se(self) -> float:
        n = max(1, int(self.metrics.get("samples", 1)))
        return float(self.metrics.get("reward/std", 0.0)) / math.sqrt(n)

    @property
    def kl(self) -> float | None:
        if "kl" in self.metrics:
            return float(self.metrics["kl"])
        return 0.0 if self.method == "base" else None


@dataclass
class BestOfN:
    label: str
    scores: list[list[float]]  # per prompt, the N rewards in sampling order

    def curve(self) -> list[tuple[int, float, float]]:
        """(k, mean best-of-k reward, KL = log k − (k−1)/k) for k = 1, 2, 4, ... N, from the first k samples."""
        from alignkit.algos.bon import bon_kl

        n = min(len(s) for s in self.scores)
        ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, n) if k <= n})
        return [(k, sum(max(s[:k]) for s in self.scores) / len(self.scores), bon_kl(k)) for k in ks]


@dataclass
class Verdicts:
    label: str
    records: list[dict]


@dataclass
class Collected:
    curves: list[Curve] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    best_of_n: list[BestOfN] = field(default_factory=list)
    verdicts: list[Verdicts] = field(default_factory=list)


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: the rest is still worth showing
                continue
    return rows


def _stage_commands(run: Path) -> dict[Path, str]:
    """stage directory -> command, from a pipeline run's recipe.resolved.yaml."""
    resolved = run / "recipe.resolved.yaml"
    if not resolved.exists():
        return {}
    stages = (yaml.safe_load(resolved.read_text()) or {}).get("stages", {})
    return {(run / name).resolve(): body.get("command", name) for name, body in stages.items()}


def _method(model: str, commands: dict[Path, str]) -> str:
    path = Path(model)
    if not path.exists():
        return "base"  # a hub id or bundled name
    path = path.resolve()
    for stage_dir, command in commands.items():
        if path == stage_dir or stage_dir in path.parents:
            return command
    if (path / "metrics.jsonl").exists() or (path.parent / "metrics.jsonl").exists():
        return path.name
    return "base"


def _visible(path: Path, run: Path) -> bool:
    return not any(part.startswith(("checkpoint-", ".")) or part == "final" for part in path.relative_to(run).parts[:-1])


def collect(runs: list[str | Path]) -> Collected:
    found = Collected()
    for run in map(Path, runs):
        if not run.is_dir():
            raise ValueError(f"report: {run} is not a directory")
        name = run.resolve().name
        commands = _stage_commands(run)
        for path in sorted(run.rglob("*")):
            if not path.is_file() or not _visible(path, run):
                continue
            where = path.parent.relative_to(run)
            label = name if str(where) == "." else f"{name}/{where}"
            if path.name == "metrics.jsonl":
                by_step = {r.get("step", i): r for i, r in enumerate(_jsonl(path))}
                found.curves.append(Curve(label, [by_step[s] for s in sorted(by_step)]))
            elif path.suffix == ".json" and path.name != "summary.json":
                try:
                    data = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(data, dict) and "reward/mean" in data and "model" in data:
                    samples_file = path.with_name(path.stem + ".samples.jsonl")
                    samples = _jsonl(samples_file) if samples_file.exists() else []
                    stem = "" if path.stem == "eval" else f"/{path.stem}"
                    found.evaluations.append(Evaluation(label + stem, _method(str(data["model"]), commands), data, samples))
            elif path.name == "bon.jsonl":
                rows = [r for r in _jsonl(path) if isinstance(r.get("scores"), list) and r["scores"]]
                if rows:
                    found.best_of_n.append(BestOfN(label, [[float(x) for x in r["scores"]] for r in rows]))
            elif path.name.endswith("verdicts.jsonl"):
                rows = [r for r in _jsonl(path) if "win" in r]
                if rows:
                    found.verdicts.append(Verdicts(f"{label}/{path.stem}", rows))
    return found
