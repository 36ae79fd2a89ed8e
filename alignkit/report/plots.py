"""The report's figures (matplotlib, Agg backend: no display needed), each saved as a PNG beside the HTML."""

from __future__ import annotations

import re
from pathlib import Path

from alignkit.report.collect import BestOfN, Curve, Evaluation
from alignkit.report.winrate import WinRate

# curve panels first in this order, then any other numeric key
PRIORITY = ["loss", "eval/loss", "reward/mean", "eval/reward/mean", "kl", "eval/kl", "accuracy", "eval/accuracy",
            "rewards/accuracies", "eval/rewards/accuracies", "rewards/margins", "distinct-2", "eval/distinct-2",
            "response/length", "entropy", "value_loss", "lr"]
SKIP = {"step", "time", "epoch"}
MAX_PANELS = 9


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay out, write (PNG, 90 dpi) and free a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "run"


def curve_keys(curve: Curve) -> list[str]:
    counts: dict[str, int] = {}
    for record in curve.records:
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + 1
    keys = [k for k in counts if counts[k] >= 1]
    ordered = [k for k in PRIORITY if k in keys] + sorted(k for k in keys if k not in PRIORITY)
    return ordered[:MAX_PANELS]


def plot_curve(curve: Curve, out: Path) -> Path | None:
    keys = curve_keys(curve)
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(curve.records) if isinstance(r.get(key), (int, float))]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(curve.label, fontsize=11)
    return _save(fig, out / f"curves_{slug(curve.label)}.png")


def plot_frontier(evaluations: list[Evaluation], best_of_n: list[BestOfN], out: Path) -> Path | None:
    """Reward vs KL(π ‖ π_ref): the DPO paper's frontier plot (Rafailov et al. 2023, fig. 2 left)."""
    points = [e for e in evaluations if e.kl is not None]
    if not points and not best_of_n:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({e.method for e in points})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for method in methods:
        mine = sorted((e for e in points if e.method == method), key=lambda e: e.kl)
        ax.errorbar([e.kl for e in mine], [e.reward for e in mine], yerr=[e.reward_se for e in mine], fmt="o",
                    color=colors[method], label=method, capsize=3)
        for e in mine:
            ax.annotate(e.label.split("/")[-1], (e.kl, e.reward), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for bon in best_of_n:
        curve = bon.curve()
        ax.plot([c[2] for c in curve], [c[1] for c in curve], "--s", markersize=4, label=f"best-of-N ({bon.label})")
        for k, reward, kl in curve:
            ax.annotate(f"N={k}", (kl, reward), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("KL(policy ‖ reference), nats per response")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "frontier.png")


def plot_behaviour(evaluations: list[Evaluation], out: Path) -> Path | None:
    """Reward beside distinct-2 and length per evaluation: reward hacking shows as reward up, diversity down."""
    if not evaluations:
        return None
    plt = _pyplot()
    labels = [e.label.split("/")[-1] for e in evaluations]
    panels = [("reward/mean", "mean reward"), ("distinct-2", "distinct-2"), ("response/length", "length (tokens)")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2 + 0.1 * len(labels)))
    for ax, (key, title) in zip(axes, panels):
        values = [float(e.metrics.get(key, float("nan"))) for e in evaluations]
        errors = [e.reward_se for e in evaluations] if key == "reward/mean" else None
        ax.barh(range(len(labels)), values, xerr=errors, color=plt.cm.tab10(panels.index((key, title))))
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, out / "behaviour.png")


def plot_win_rates(rates: list[WinRate], out: Path) -> Path | None:
    if not rates:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rates)))
    ys = range(len(rates))
    ax.barh([y - 0.2 for y in ys], [r.raw for r in rates], height=0.4, xerr=[r.raw_se for r in rates], label="raw")
    ax.barh([y + 0.2 for y in ys], [r.length_controlled for r in rates], height=0.4, label="length-controlled")
    ax.axvline(0.5, color="gray", linestyle=":")
    ax.set_yticks(list(ys), [r.label for r in rates], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate against the baseline")
    ax.legend(fontsize=8)
    return _save(fig, out / "win_rates.png")
