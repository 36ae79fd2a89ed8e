"""alignkit SFT vs TRL's SFTTrainer, side by side in one run, on the same conversations, model and hyperparameters.

    .venv/bin/python bench/bench_sft.py [--models smollm2,tiny] [--examples 128] [--skip-trl] [--repeat N]

Workload: the first ``--examples`` conversations of bundled:instructions_train as prompt (the user turn) and
completion (the assistant turn), both message lists, so each side renders SmolLM2's chat template and takes the loss
on the completion only; batch 8, max length 256, one epoch, lr 2e-5 linear, full fine-tune. Four arms, each in its
own process (its peak RSS is its own): alignkit padding-free (its default: a batch's examples share a few rows, little
padding), alignkit ``--no-padding-free`` (one right-padded row per example), TRL with ``padding_free=True`` (the
batch flattened into one row with restarting position ids, which transformers turns into a block-causal SDPA mask)
and TRL padded; TRL without gradient checkpointing, bf16 only where the CPU has native bf16 (as alignkit's auto).

Printed per arm, as bench_dpo.py does: end to end (process start to saved model, imports included), the median
steady step (step k−1 -> k, k >= 2), start-up = end to end − steps x steady step, peak RSS, CPU seconds, load. The
FLOP bound (``flops.train_flops``, at this machine's measured matmul rate for the precision used) counts each
example's real tokens through the body and the LM head at its completion tokens only (the positions the loss
reads); the ratios to TRL use TRL's faster arm. The mean completion NLL of every trained model on the examples
(one evaluation code for all) checks that the arms trained the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from flops import (
    arm_arguments,
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

BATCH, MAX_LENGTH, LR = 8, 256, 2e-5
STARTED = time.perf_counter()  # the worker process's own start (imports included, as a user's run pays them)


def make_examples(n: int) -> list[dict]:
    from alignkit.data import load_records

    rows = []
    for record_ in load_records("bundled:instructions_train")[:n]:
        messages = record_.data["messages"]
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def run_alignkit(path: str, data: Path, out: Path, precision: str, padding_free: bool) -> dict:
    from alignkit.algos import sft
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig

    sft.train(sft.SFTConfig(
        model=ModelConfig(model=path), data=DataConfig(data=str(data), max_length=MAX_LENGTH),
        train=TrainConfig(output_dir=str(out), epochs=1, batch_size=BATCH, lr=LR, schedule="linear", warmup_ratio=0.0,
                          mixed_precision=precision, report_to="none", progress=False),
        padding_free=padding_free))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": [r["time"] for r in rows if "loss" in r]}


def run_trl(path: str, data: Path, out: Path, bf16: bool, padding_free: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    clock, ends = trl_step_clock()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                     # padding-free TRL wants no max_length (it would not enforce it); no example reaches it anyway
                     lr_scheduler_type="linear", max_length=None if padding_free else MAX_LENGTH, padding_free=padding_free,
                     gradient_checkpointing=False, bf16=bf16, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[clock])
    trainer.train()
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return {"step_ends": [t - STARTED for t in ends]}


def worker(args: argparse.Namespace) -> None:
    data, out = Path(args.data), Path(args.out)
    if args.worker.startswith("trl"):
        result = run_trl(args.model, data, out, args.precision == "bf16", padding_free=args.worker == "trl")
    else:
        result = run_alignkit(args.model, data, out, args.precision, padding_free=args.worker == "alignkit")
    report(result, STARTED)


def tokens(path: str, data: Path) -> tuple[int, int, int]:
    """(examples, tokens, completion tokens) as alignkit renders them (the same chat template as TRL's)."""
    from alignkit.data import IGNORE, read_examples, sft_example
    from alignkit.models import load_tokenizer

    examples = read_examples(str(data), sft_example, load_tokenizer(path), MAX_LENGTH)
    return (len(examples), sum(len(e.input_ids) for e in examples),
            sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples))


@torch.no_grad()
def completion_nll(model_dir: Path, data: Path) -> float:
    """Token-mean NLL of the completions under a trained model; one code for every arm."""
    from alignkit.algos.sft import mean_nll
    from alignkit.data import read_examples, sft_example
    from alignkit.data.collate import pad_sft
    from alignkit.logprobs import LogprobModel
    from alignkit.models import load_model

    model, tokenizer = load_model(str(model_dir))
    examples = read_examples(str(data), sft_example, tokenizer, MAX_LENGTH)
    batches = [pad_sft(examples[i : i + 16], tokenizer.pad_token_id) for i in range(0, len(examples), 16)]
    return mean_nll(LogprobModel(model), batches, contextlib.nullcontext)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    arm_arguments(parser, ["alignkit", "alignkit-padded", "trl", "trl-padded"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    data = work / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_examples(args.examples)))
    rates = machine_rates(args.threads)
    names = {"alignkit": "alignkit (padding-free)", "alignkit-padded": "alignkit --no-padding-free",
             "trl": "TRL padding_free=True", "trl-padded": "TRL padded"}
    for name in args.models.split(","):
        path = model_path(name, work)
        from alignkit.models import load_model

        body, head = linear_params(load_model(path)[0])
        n, all_tokens, completion_tokens = tokens(path, data)
        steps = -(-n // BATCH)
        for precision in rates:
            label = "bf16" if precision == "bf16" else "fp32"
            kinds = ["alignkit", "alignkit-padded"] + ([] if args.skip_trl else ["trl", "trl-padded"])

            results = run_arms(__file__, kinds, args.repeat, args.threads, work, f"{name} {label}", model=path, data=data,
                               precision=precision)
            refresh_rates(rates)
            epoch = train_flops(body, head, all_tokens, completion_tokens) / (rates[precision] * 1e9)
            step = epoch / steps
            peer = min((r for k, r in results.items() if k.startswith("trl")), key=lambda r: r["total_s"], default=None)
            print(f"\n[{name}, {label}] {n} conversations ({all_tokens} tokens, {completion_tokens} in completions), "
                  f"batch {BATCH}, 1 epoch = {steps} steps. FLOP bound at {rates[precision]:.0f} GFLOP/s: steady step "
                  f"{step:.2f} s, epoch {epoch:.1f} s")
            print(f"{'run':<27} {'end to end':>10} {'start-up':>9} {'step':>7} {'step/bound':>10} {'e2e/bound':>9} "
                  f"{'peak RSS':>9} {'CPU':>7} {'load':>5} {'TRL best / it':>13}")
            for kind, r in results.items():
                vs = f"{peer['total_s'] / r['total_s']:12.2f}x" if peer else f"{'-':>13}"
                print(f"{names[kind]:<27} {r['total_s']:9.1f}s {r['startup_s']:8.1f}s {r['step_s']:6.2f}s "
                      f"{r['step_s'] / step:9.2f}x {r['total_s'] / epoch:8.2f}x {r['peak_rss_mb']:7.0f}MB "
                      f"{r['cpu_s']:6.0f}s {r['load']:5.1f} {vs}")
            if peer:
                ours = results["alignkit"]
                print(f"alignkit vs TRL's faster arm: {peer['total_s'] / ours['total_s']:.2f}x end to end, "
                      f"{peer['step_s'] / ours['step_s']:.2f}x per steady step")
            print_rounds(results, args.repeat)
            record("sft", model=name, precision=label, gflops=rates[precision], bound_step=step, bound_epoch=epoch,
                   alignkit_e2e=results["alignkit"]["total_s"], alignkit_step=results["alignkit"]["step_s"],
                   **({"trl_e2e": peer["total_s"], "trl_step": peer["step_s"]} if peer else {}))
            nll = {kind: completion_nll(r["out"] / "final", data) for kind, r in results.items()}
            print(f"completion NLL on the examples (start {completion_nll(Path(path), data):.4f}) after one epoch: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in nll.items()), flush=True)
    print(f"machine load at the end: {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
