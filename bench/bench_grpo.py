"""GRPO step time: alignkit against TRL's GRPOTrainer, side by side in one run, on the same task.

    .venv/bin/python bench/bench_grpo.py [--steps 2] [--models tiny,smollm2-135m] [--beta 0.04] [--skip-trl]

Task (issue #4): 16 movie-review prompts (alignkit/bundled/movie_prompts_train.jsonl, plain text, no chat
template) x 4 samples x 32 new tokens per step, VADER sentiment of the completion as the reward, temperature 1,
β = 0.04 (both load a reference model), token-mean loss over the batch (TRL's "dapo"), one optimizer step per
rollout, lr 1e-6, fp32 for both (this CPU has no native bf16; bf16 is several times slower here).
TRL runs at its best setting here: gradient checkpointing off, bf16 off, the whole rollout as one batch.
Models: the tiny 2-layer, 128-wide llama with the SmolLM2 vocabulary, and SmolLM2-135M-Instruct.

Step time = wall time of a whole optimizer step (sampling, scoring, reference and policy passes, backward,
AdamW), median over ``--steps`` steps; the first step of each trainer is included (nothing is compiled).
TRL's step is timed by a callback from on_step_begin to on_step_end, which includes its generation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from alignkit.rewards.functions import vader_compound

PROMPTS = Path(__file__).resolve().parents[1] / "alignkit" / "bundled" / "movie_prompts_train.jsonl"
PROMPTS_PER_STEP, GROUP, NEW_TOKENS = 16, 4, 32


def model_dir(name: str, root: Path) -> str:
    """A directory both trainers can load: the tiny llama saved once, or the cached SmolLM2 import."""
    from alignkit.models import load_model, tiny_causal_lm

    if name != "tiny":
        model, tokenizer = load_model(name)
    else:
        model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=128)
    path = root / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def alignkit_steps(path: str, steps: int, beta: float, out: Path) -> list[float]:
    from alignkit.algos.grpo import GRPOConfig, train
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig
    from alignkit.online import RolloutConfig

    cfg = GRPOConfig(
        model=ModelConfig(model=path),
        data=DataConfig(data=str(PROMPTS), eval_data="", max_length=256),
        train=TrainConfig(output_dir=str(out), lr=1e-6, batch_size=PROMPTS_PER_STEP * GROUP, grad_accum=1,
                          max_steps=steps, report_to="none", progress=False, mixed_precision="no"),
        rollout=RolloutConfig(reward="vader", prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP,
                              max_new_tokens=NEW_TOKENS, eval_prompts=0),
        beta=beta,
    )
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/update" in r]
    for r in rows:
        print(f"  alignkit step {r['step']}: rollout {r['time/rollout']:.2f} s, update {r['time/update']:.2f} s, "
              f"reward {r['reward/mean']:.3f}, length {r['response/length']:.1f}")
    return [r["time/rollout"] + r["time/update"] for r in rows]


def trl_steps(path: str, steps: int, beta: float, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])

    def vader(completions, **_):
        return [vader_compound(c) for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.started)

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, max_steps=steps, learning_rate=1e-6, beta=beta,
        loss_type="dapo", temperature=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True,
        report_to="none", logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    timer = Timer()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=vader, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    for k, t in enumerate(timer.times):
        print(f"  TRL step {k + 1}: {t:.2f} s")
    return timer.times


def ppo_step(path: str, out: Path) -> float | None:
    """One alignkit PPO step on the same task (64 prompts x 1 sample, value head, its default 4 PPO epochs);
    its own time/rollout + time/update."""
    from alignkit.algos import ppo
    from alignkit.cli import _fields, build_config

    wanted = {"model": path, "data": str(PROMPTS), "eval_data": "", "reward": "vader", "max_new_tokens": NEW_TOKENS,
              "prompts_per_step": PROMPTS_PER_STEP * GROUP, "group_size": 1, "max_steps": 1, "output_dir": str(out),
              "report_to": "none", "progress": False, "eval_prompts": 0, "batch_size": PROMPTS_PER_STEP * GROUP,
              "grad_accum": 1, "lr": 1e-6}
    known = {name for name, *_ in _fields(ppo.PPOConfig)}
    ppo.train(build_config(ppo.PPOConfig, {k: v for k, v in wanted.items() if k in known}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if "time/update" in r][-1]
    print(f"  alignkit PPO step: rollout {row['time/rollout']:.2f} s, update {row['time/update']:.2f} s")
    return row["time/rollout"] + row["time/update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; {load}")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            path = model_dir(name, root)
            print(f"\n== {name}: {PROMPTS_PER_STEP} prompts x {GROUP} samples x {NEW_TOKENS} tokens, beta {args.beta}")
            ours = statistics.median(alignkit_steps(path, args.steps, args.beta, root / f"ak-{name}"))
            theirs = None if args.skip_trl else statistics.median(trl_steps(path, args.steps, args.beta, root / f"trl-{name}"))
            ppo = None if args.skip_ppo else ppo_step(path, root / f"ppo-{name}")
            table.append((name, ours, theirs, ppo))
    print(f"\nmedian step time (s); machine load at the end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"{'model':<14} {'alignkit GRPO':>14} {'TRL GRPO':>10} {'TRL/alignkit':>13} {'alignkit PPO (1 step)':>22}")
    for name, ours, theirs, ppo in table:
        ratio = f"{theirs / ours:.1f}x" if theirs else "-"
        print(f"{name:<14} {ours:>14.2f} {theirs or float('nan'):>10.2f} {ratio:>13} {ppo or float('nan'):>22.2f}")


if __name__ == "__main__":
    main()
