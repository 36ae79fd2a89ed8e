"""``alignkit quickstart``: the bundled ``quickstart`` recipe (sample -> DPO with LoRA -> evaluate before and
after -> report), run by the pipeline like any recipe, then the result in three numbers.

The rise in held-out reward is paired by prompt: both evaluations sample the same held-out openings with the same
seed, so its standard error is that of the per-prompt differences of mean reward, sd(Δ_p)/√P, over the P prompts
(samples of one prompt are not independent of each other, prompts are).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from alignkit.pipeline import run_recipe


def paired_rise(before: list[dict], after: list[dict]) -> tuple[float, float, int]:
    """(mean over prompts of Δ_p, its standard error, P) with Δ_p = mean after reward − mean before reward on
    prompt p, from two evaluate ``*.samples.jsonl`` record lists."""

    def per_prompt(samples: list[dict]) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for s in samples:
            sums.setdefault(s["prompt"], []).append(float(s["reward"]))
        return {p: sum(v) / len(v) for p, v in sums.items()}

    b, a = per_prompt(before), per_prompt(after)
    diffs = [a[p] - b[p] for p in b if p in a]
    if len(diffs) < 2:
        raise ValueError(f"paired rise needs at least 2 shared prompts, got {len(diffs)}")
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return mean, sd / math.sqrt(len(diffs)), len(diffs)


def summarize(run_dir: Path) -> dict:
    def read(stage: str) -> tuple[dict, list[dict]]:
        metrics = json.loads((run_dir / stage / "eval.json").read_text())
        lines = (run_dir / stage / "eval.samples.jsonl").read_text().splitlines()
        return metrics, [json.loads(line) for line in lines if line.strip()]

    (before, before_samples), (after, after_samples) = read("eval_base"), read("eval_dpo")
    rise, se, prompts = paired_rise(before_samples, after_samples)
    return {"reward_before": before["reward/mean"], "reward_after": after["reward/mean"], "rise": rise, "rise_se": se,
            "prompts": prompts, "kl": after.get("kl"), "distinct2_before": before.get("distinct-2"),
            "distinct2_after": after.get("distinct-2"), "report": str(run_dir / "report" / "report.html")}


def quickstart(run_dir: str = "runs/quickstart", overrides: list[str] | tuple[str, ...] = (), echo: bool = True) -> dict:
    started = time.time()
    run_recipe("bundled:quickstart", overrides, run_dir, echo=echo)
    summary = summarize(Path(run_dir).resolve())
    summary["seconds"] = time.time() - started
    kl = f"{summary['kl']:.2f}" if summary["kl"] is not None else "n/a"
    verdict = "above noise" if summary["rise"] > 2 * summary["rise_se"] else "NOT above noise (< 2 SE)"
    print(f"\nheld-out VADER reward: {summary['reward_before']:.3f} -> {summary['reward_after']:.3f}, "
          f"rise {summary['rise']:+.3f} ± {summary['rise_se']:.3f} (SE over {summary['prompts']} prompts, paired): "
          f"{summary['rise'] / max(summary['rise_se'], 1e-12):.1f} SE, {verdict}")
    print(f"KL(DPO policy ‖ base): {kl} nats/response; distinct-2 {summary['distinct2_before']:.3f} -> "
          f"{summary['distinct2_after']:.3f}")
    print(f"report: {summary['report']}   ({summary['seconds']:.0f} s)")
    sys.stdout.flush()
    return summary


def add_quickstart_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="stage.key=value",
                        help="override the bundled recipe (e.g. dpo.lr=1e-4); see alignkit/recipes/quickstart.yaml")
    parser.add_argument("--run-dir", default="runs/quickstart", help="run directory")


def quickstart_cli(args: argparse.Namespace) -> None:
    quickstart(args.run_dir, args.overrides)
