"""alignkit KTO vs TRL's KTOTrainer, side by side in one run, on the same unpaired examples, model and settings.

    .venv/bin/python bench/bench_kto.py [--models smollm2,tiny] [--pairs 64] [--skip-trl] [--repeat N]

Workload: bench_dpo.py's preference pairs split into unpaired examples (each chosen answer desirable, each rejected
one undesirable: 2 x ``--pairs`` examples), batch 8, max length 128, one epoch, β 0.1, λ_D = λ_U = 1, lr 5e-6
linear, full fine-tune. alignkit runs padding-free (its default) and with ``--no-packing``. Both estimate KTO's reference point z0 from mismatched (prompt, other completion) pairs,
and both hold a frozen reference copy. TRL runs at its fastest setting on this machine (no gradient
checkpointing; bf16 only where the CPU has native bf16, as alignkit's auto), with its default of computing the
reference log-probs inside each step; alignkit precomputes them in one pass before training (its default).

Printed per arm, as bench_dpo.py does: end to end (process start to saved model), the median steady step, start-up =
end to end − steps x steady step, peak RSS, CPU seconds, load. The FLOP bound (``flops.train_flops``, at this
machine's measured matmul rate) counts per steady step the policy's forward + backward over the labelled examples'
real tokens (LM head at completion tokens) and a forward over as many mismatched tokens (taken equal to the labelled
ones); the epoch adds the reference's forward over both. The implicit-reward accuracy (the AUC of
log π/π_ref between desirable and undesirable examples, ``alignkit.algos.kto.implicit_reward_accuracy``) of every
trained model, by one evaluation code, checks that the arms learned the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_dpo import make_pairs
from flops import (
    arm_arguments,
    arm_figures,
    linear_params,
    machine_rates,
    model_path,
    print_rounds,
    record,
    refresh_rates,
    report,
    run_arms,
    train_flops,
    trl_step_clock,
)

BATCH, MAX_LENGTH, LR, BETA = 8, 128, 5e-6, 0.1
STARTED = time.perf_counter()  # the worker process's own start (imports included, as a user's run pays them)


def unpaired(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def run_alignkit(path: str, data: Path, out: Path, precision: str, packing: bool) -> dict:
    from alignkit.algos import kto
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig

    kto.train(kto.KTOConfig(
        model=ModelConfig(model=path), data=DataConfig(data=str(data), max_length=MAX_LENGTH),
        train=TrainConfig(output_dir=str(out), epochs=1, batch_size=BATCH, lr=LR, schedule="linear", warmup_ratio=0.0,
                          mixed_precision=precision, report_to="none", progress=False),
        beta=BETA, packing=packing))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": [r["time"] for r in rows if "loss" in r]}


def run_trl(path: str, data: Path, out: Path, bf16: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    clock, ends = trl_step_clock()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    args = KTOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                     lr_scheduler_type="linear", max_length=MAX_LENGTH, beta=BETA, desirable_weight=1.0,
                     undesirable_weight=1.0, gradient_checkpointing=False, bf16=bf16, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[clock])
    trainer.train()
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return {"step_ends": [t - STARTED for t in ends]}


def worker(args: argparse.Namespace) -> None:
    data, out = Path(args.data), Path(args.out)
    if args.worker == "trl":
        result = run_trl(args.model, data, out, args.precision == "bf16")
    else:
        result = run_alignkit(args.model, data, out, args.precision, packing=args.worker == "alignkit")
    report(result, STARTED)


def examples_of(path: str, data: Path):
    from alignkit.data import read_examples, unpaired_example
    from alignkit.models import load_tokenizer

    return read_examples(str(data), unpaired_example, load_tokenizer(path), MAX_LENGTH)


@torch.no_grad()
def reward_accuracy(model_dir: Path, init_path: str, data: Path) -> float:
    """AUC of the implicit reward log π(y|x) − log π_ref(y|x) between desirable and undesirable examples."""
    from alignkit.algos.kto import collate_unpaired, completion_logps, implicit_reward_accuracy
    from alignkit.logprobs import LogprobModel
    from alignkit.models import load_model

    examples = examples_of(init_path, data)
    items = [(e, e.completion_ids, 0.0, 0.0) for e in examples]

    def logps(path: str) -> torch.Tensor:
        model, tokenizer = load_model(path)
        module, out = LogprobModel(model), []
        for i in range(0, len(items), 16):
            batch = collate_unpaired(items[i : i + 16], tokenizer.pad_token_id)
            out.append(completion_logps(module, batch, "labelled"))
        return torch.cat(out)

    rewards = logps(str(model_dir)) - logps(init_path)
    return float(implicit_reward_accuracy(rewards, torch.tensor([e.desirable for e in examples])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    arm_arguments(parser, ["alignkit", "alignkit-padded", "trl"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="bench-kto-"))
    data = work / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in unpaired(make_pairs(args.pairs))))
    rates = machine_rates(args.threads)
    names = {"alignkit": "alignkit (padding-free)", "alignkit-padded": "alignkit --no-packing",
             "trl": "TRL KTOTrainer (best)"}
    for name in args.models.split(","):
        path = model_path(name, work)
        from alignkit.models import load_model

        body, head = linear_params(load_model(path)[0])
        examples = examples_of(path, data)
        tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
        completions = sum(len(e.completion_ids) for e in examples)
        steps = -(-len(examples) // BATCH)
        for precision in rates:
            label = "bf16" if precision == "bf16" else "fp32"
            kinds = ["alignkit", "alignkit-padded"] + ([] if args.skip_trl else ["trl"])

            results = run_arms(__file__, kinds, args.repeat, args.threads, work, f"{name} {label}", model=path, data=data,
                               precision=precision)
            refresh_rates(rates)
            rate = rates[precision] * 1e9
            # per epoch: policy forward + backward and the mismatched forward; the reference forward over both, each
            # prompt once (followed by its completion and its mismatched one, taken as long as its own)
            training = train_flops(body, head, tokens, completions, tokens, completions)
            epoch = (training + 2.0 * (body * (tokens + completions) + head * 2 * completions)) / rate
            step = training / steps / rate
            print(f"\n[{name}, {label}] {len(examples)} unpaired examples ({tokens} tokens, {completions} in completions), "
                  f"batch {BATCH}, 1 epoch = {steps} steps. FLOP bound at {rates[precision]:.0f} GFLOP/s: steady step "
                  f"{step:.2f} s, epoch with reference {epoch:.1f} s")
            print(f"{'run':<24} {'end to end':>10} {'start-up':>9} {'step':>7} {'step/bound':>10} {'e2e/bound':>9} "
                  f"{'peak RSS':>9} {'CPU':>7} {'load':>5} {'vs alignkit':>11}")
            ours = results["alignkit"]
            for kind, r in results.items():
                print(f"{names[kind]:<24} {r['total_s']:9.1f}s {r['startup_s']:8.1f}s {r['step_s']:6.2f}s "
                      f"{r['step_s'] / step:9.2f}x {r['total_s'] / epoch:8.2f}x {r['peak_rss_mb']:7.0f}MB "
                      f"{r['cpu_s']:6.0f}s {r['load']:5.1f} {r['total_s'] / ours['total_s']:10.2f}x")
            print_rounds(results, args.repeat)
            record("kto", model=name, precision=label, gflops=rates[precision], bound_step=step, bound_epoch=epoch,
                   **arm_figures(results))
            accuracy = {kind: reward_accuracy(r["out"] / "final", path, data) for kind, r in results.items()}
            print("implicit-reward accuracy (AUC, desirable vs undesirable) after the epoch: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), flush=True)
    print(f"machine load at the end: {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
