"""alignkit's reward-model trainer vs TRL's RewardTrainer, side by side in one run, same pairs, init and schedule.

    .venv/bin/python bench/bench_rm.py [--models tiny,smollm2] [--pairs 64] [--threads N] [--trl-defaults tiny]

Workload (issue #3): 64 preference pairs (bundled instruction prompts, chat-formatted; chosen = the reference answer,
rejected = the answer to another question, so lengths vary), max length 128, batch 8, one epoch, full fine-tune, on
SmolLM2-135M and on a tiny 2-layer/128-wide llama with the SmolLM2 vocabulary.

Both trainers start from the same saved sequence-classification checkpoint (one random score head), read the same
token ids in the same order (TRL gets alignkit's ids pre-tokenised and a sequential sampler over alignkit's
shuffle), with the same AdamW, learning rate, cosine schedule and clipping, so their per-step losses must agree up
to rounding; the script checks that. TRL runs at its fastest setting on this machine: no gradient checkpointing,
bf16 only where the CPU has native bf16 (like alignkit's ``mixed_precision=auto``); ``--trl-defaults`` also runs
it with its defaults (gradient checkpointing on, bf16 on) on the models named. alignkit runs padding-free (its
default: each prompt once, packed rows) and with ``--no-packing`` (right-padded rows: the before). Each run is its
own process, so peak RSS is its own. Printed per run: end to end (process start to saved model), the median
steady-state step (steps 2..), start-up = end to end − steps x steady step, and their multiples of the FLOP bound
at this machine's matmul rate for the precision used (fp32 runs too where the CPU has native bf16). Timings on a
shared machine are noisy: the load average is printed next to them.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from flops import alternate, arm_figures, machine_rates, record, refresh_rates, run_worker

LR = 1e-5
MAX_LENGTH = 128
BATCH = 8
SEED = 0


def make_pairs(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """n chat-formatted pairs of at most ``max_length`` tokens (SmolLM2 template)."""
    from alignkit.data import load_records, preference_example
    from alignkit.data.records import Record
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    conversations = [r.data["messages"] for r in load_records("bundled:instructions_train")]
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        question, other = rng.sample(conversations, 2)
        row = {"prompt": question[:-1], "chosen": question[-1:], "rejected": other[-1:]}
        example = preference_example(Record(row, "bench"), tokenizer, None)
        if len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids)) <= max_length:
            rows.append(row)
    return rows


def init_checkpoint(name: str, out: Path) -> Path:
    """A sequence-classification checkpoint (fresh seeded score head, distinct pad token) that both trainers load."""
    from alignkit.algos.rm import load_reward_model
    from alignkit.models import tiny_causal_lm

    source = "smollm2-135m"
    if name == "tiny":
        model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=128)
        source = str(out / "tiny-lm")
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    torch.manual_seed(SEED)
    model, tokenizer = load_reward_model(source)
    path = out / f"init-{name}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- the workers


STARTED = time.perf_counter()  # the worker process's start (imports included)


def run_alignkit(init: str, data: str, out: str, packing: bool = True, precision: str = "auto") -> dict:
    from alignkit.algos import rm
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig

    cfg = rm.RMConfig(
        model=ModelConfig(model=init),
        data=DataConfig(data=data, max_length=MAX_LENGTH),
        train=TrainConfig(output_dir=out, epochs=1, batch_size=BATCH, lr=LR, schedule="cosine", seed=SEED,
                          report_to="none", progress=False, mixed_precision=precision),
        packing=packing,
    )
    start = time.perf_counter()
    rm.train(cfg)
    total = time.perf_counter() - start
    logs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logs if "loss" in m]
    return {"losses": [m["loss"] for m in steps], "train_s": steps[-1]["time"], "total_s": total,
            "step_ends": [m["time"] for m in steps]}


def run_trl(init: str, data: str, out: str, defaults: bool, precision: str = "auto") -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from alignkit.algos.rm import rm_example
    from alignkit.data import read_examples
    from alignkit.models import bf16_is_fast

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(init)
    examples = read_examples(data, rm_example, tokenizer, MAX_LENGTH)
    # alignkit's order for epoch 0, fed to TRL through a sequential sampler
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SEED)).tolist()
    dataset = Dataset.from_dict({
        "chosen_ids": [examples[i].prompt_ids + examples[i].chosen_ids for i in order],
        "rejected_ids": [examples[i].prompt_ids + examples[i].rejected_ids for i in order],
    })
    model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=1, dtype=torch.float32)
    speed = {} if defaults else {"gradient_checkpointing": False,
                                 "bf16": bf16_is_fast() if precision == "auto" else precision == "bf16"}
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter() - start)

    args = RewardConfig(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                        max_length=MAX_LENGTH, seed=SEED, logging_steps=1, save_strategy="no", report_to=[],
                        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                        train_sampling_strategy="sequential", **speed)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[StepEnds()])
    train_start = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    losses = [m["loss"] for m in trainer.state.log_history if "loss" in m]
    return {"losses": losses, "train_s": end - train_start, "total_s": end - start, "step_ends": ends,
            "setting": f"gradient_checkpointing={args.gradient_checkpointing}, bf16={args.bf16}"}


def worker(args: argparse.Namespace) -> None:
    if args.worker.startswith("alignkit"):
        result = run_alignkit(args.init, args.data, args.out, args.worker == "alignkit", args.precision)
    else:
        result = run_trl(args.init, args.data, args.out, args.worker == "trl-defaults", args.precision)
    result["process_s"] = time.perf_counter() - STARTED
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["cpu_s"] = time.process_time()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ the driver


def launch(kind: str, init: Path, data: Path, out: Path, threads: int, precision: str = "auto") -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--init", str(init), "--data", str(data), "--out", str(out),
               "--precision", precision]
    result = run_worker(command, threads)
    result["startup_s"] = result["process_s"] - result["steps"] * result["step_s"]
    return result


def flop_bound(init: Path, data: Path, gflops: float) -> tuple[float, float]:
    """(TFLOP, seconds) one epoch cannot go below: forward + backward of the backbone over every real token of
    chosen and rejected (the score head is one row: negligible)."""
    from flops import train_flops

    from alignkit.algos.rm import load_reward_model
    from alignkit.data import preference_example, read_examples

    model, tokenizer = load_reward_model(str(init))
    examples = read_examples(str(data), preference_example, tokenizer, MAX_LENGTH)
    tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "score" not in n)
    flop = train_flops(body, 0, tokens, 0)
    return flop / 1e12, flop / (gflops * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the arms this many rounds and keep each arm's fastest steady step")
    parser.add_argument("--trl-defaults", default="", help="models (e.g. tiny) on which TRL also runs with its defaults")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest per-step loss difference accepted")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: torch's default); 1 avoids OpenMP stalls on a busy machine")
    parser.add_argument("--worker", choices=["alignkit", "alignkit-padded", "trl", "trl-defaults"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    work = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, MAX_LENGTH)))
    print(f"{args.pairs} pairs, batch {BATCH}, max length {MAX_LENGTH}, 1 epoch, lr {LR}")
    rates = machine_rates(args.threads)  # at the runs' thread count
    precisions = list(rates)
    ok = True
    for name in args.models.split(","):
        init = init_checkpoint(name, work)
        for precision in precisions:
            label = "bf16" if precision == "bf16" else "fp32"
            kinds = ["trl", "alignkit", "alignkit-padded"] + (["trl-defaults"] if name in args.trl_defaults.split(",") else [])

            def run(kind: str, round_: int, name=name, label=label, init=init, precision=precision) -> dict:
                return launch(kind, init, data, work / f"{kind}-{name}-{label}-{round_}", args.threads, precision)

            results = alternate(kinds, args.repeat, run)
            ours = results["alignkit"]
            refresh_rates(rates)
            tflop, bound = flop_bound(init, data, rates[precision])
            steps = len(ours["step_ends"])
            print(f"\n[{name}, {label}] FLOP bound {tflop:.2f} TFLOP: epoch {bound:.1f} s, steady step {bound / steps:.2f} s "
                  f"at {rates[precision]:.0f} GFLOP/s (each pair's prompt counted twice)")
            print(f"{'run':<24} {'end to end':>10} {'start-up':>9} {'step':>7} {'step/bound':>10} {'train/bound':>11} "
                  f"{'peak RSS':>9} {'load':>5} {'train vs alignkit':>17}")
            for kind, r in results.items():
                who = {"alignkit": "alignkit (padding-free)", "alignkit-padded": "alignkit --no-packing",
                       "trl": "TRL best", "trl-defaults": "TRL defaults"}[kind]
                print(f"{who:<24} {r['process_s']:9.1f}s {r['startup_s']:8.1f}s {r['step_s']:6.2f}s "
                      f"{r['step_s'] / (bound / steps):9.2f}x {r['train_s'] / bound:10.2f}x {r['peak_rss_mb']:7.0f}MB "
                      f"{r['load']:5.1f} {r['train_s'] / ours['train_s']:16.2f}x"
                      + (f"  [{r['setting']}]" if "setting" in r else ""))
            if args.repeat > 1:
                print(f"fastest of {args.repeat} alternating runs per arm; steps of every round: " + "; ".join(
                    f"{k} " + " ".join(f"{s:.2f}" for s in r["step_s_all"]) for k, r in results.items()))
            record("rm", model=name, precision=label, gflops=rates[precision], bound_step=bound / steps,
                   bound_epoch=bound,
                   **arm_figures(results, (("e2e", "process_s"), ("step", "step_s"), ("train", "train_s"))))
            for kind in [k for k in results if k != "alignkit"]:
                theirs = results[kind]["losses"]
                diff = max(abs(a - b) for a, b in zip(ours["losses"], theirs, strict=True))
                agree = diff <= args.tolerance and len(theirs) == len(ours["losses"])
                ok &= agree
                print(f"[{name}] per-step loss, alignkit vs {kind}: max |diff| {diff:.4f} over {len(theirs)} steps "
                      f"({'agree' if agree else 'DISAGREE'})\n  alignkit {[round(x, 4) for x in ours['losses']]}\n"
                      f"  {kind:8s} {[round(x, 4) for x in theirs]}")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
