"""alignkit DPO vs TRL's DPOTrainer, side by side in one run, on the same pairs, model and hyperparameters.

    .venv/bin/python bench/bench_dpo.py [--models smollm2,tiny] [--pairs 64] [--skip-trl] [--lora]

Workload (issue #3): 64 preference pairs, batch 8, max length 128, one epoch, full fine-tune, on SmolLM2-135M
and on a tiny 2-layer/128-wide llama with the SmolLM2 vocabulary. TRL runs at its fastest setting on this
machine (no gradient checkpointing; bf16 only where the CPU has native bf16, as for alignkit). alignkit runs twice:
padding-free (its default, ``--packing``) and with ``--no-packing`` (one right-padded row per answer: the layout
before padding-free packing), so before/after and the peer come from one run.

Every run is its own process (its peak RSS is its own). Printed per run: end-to-end time (process start to saved
model), the median steady-state step time (step k−1 -> k from the trainer's own log, k >= 2), start-up = end to
end − steps x steady step (load, tokenising, alignkit's reference pass, the first step's warm-up, saving), and peak
RSS. The FLOP bound is at this machine's measured matmul rate for the precision used (``flops.py``): per steady
step the policy's forward + backward over the step's real tokens (LM head at response tokens only; each pair's
prompt counted twice, as the padded algorithm computes it; the bound with the prompt counted once is printed
beside it), end to end plus one reference forward. On a CPU with native bf16 the fp32 runs are printed too. The
DPO loss of each trained model on the pairs (same evaluation code, same initial reference) checks that all runs
trained the same thing.

``--lora``: both sides train a LoRA adapter instead (rank 16, alpha 32, no dropout, every linear layer of the blocks,
lr 5e-4, as the bundled recipes do; TRL through peft, its reference the base with the adapter disabled). The bound
then counts forward + input gradients only (the frozen weights get no gradient): 4 instead of 6 FLOPs per weight
and token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from flops import (
    arm_arguments,
    arm_figures,
    machine_rates,
    model_path,
    print_rounds,
    record,
    refresh_rates,
    report,
    run_arms,
    trl_step_clock,
)

GOOD = ["a warm, funny and beautifully acted film", "a gripping story with a superb cast", "moving, clever and full of heart",
        "the best thing I have seen this year", "a delight from start to finish, with wonderful music"]
BAD = ["a dull, clumsy mess", "boring and far too long", "badly written and worse acted",
       "a tedious film with no ideas", "painful to sit through, with a silly ending"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    from alignkit.data import load_records

    prompts = [r.data["prompt"] for r in load_records("bundled:movie_prompts_train")]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = ", ".join(rng.sample(GOOD, rng.randint(1, 3)))
        bad = ", ".join(rng.sample(BAD, rng.randint(1, 3)))
        rows.append({"prompt": prompts[i % len(prompts)], "chosen": f" {good}.", "rejected": f" {bad}."})
    return rows


LORA_R, LORA_ALPHA, LORA_LR = 16, 32, 5e-4  # --lora: the bundled recipes' adapter and learning rate


def run_alignkit(model_path: str, data: Path, out: Path, precision: str, packing: bool, lora: bool = False) -> dict:
    from alignkit.algos import dpo
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig

    cfg = dpo.DPOConfig(
        model=ModelConfig(model=model_path, lora=lora, lora_r=LORA_R, lora_alpha=LORA_ALPHA),
        data=DataConfig(data=str(data), max_length=128),
        train=TrainConfig(output_dir=str(out), epochs=1, batch_size=8, lr=LORA_LR if lora else 5e-6, schedule="linear",
                          warmup_ratio=0.0, mixed_precision=precision, report_to="none", progress=False),
        packing=packing,
    )
    dpo.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_ends": [r["time"] for r in rows if "loss" in r]}


def run_trl(model_path: str, data: Path, out: Path, bf16: bool, lora: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    clock, ends = trl_step_clock()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1,
                     learning_rate=LORA_LR if lora else 5e-6,
                     lr_scheduler_type="linear", max_length=128, gradient_checkpointing=False, bf16=bf16,
                     logging_steps=1, report_to=[], save_strategy="no", beta=0.1, use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[clock], peft_config=peft_config)
    trainer.train()
    trainer.model.save_pretrained(out / "final")  # with --lora the adapter, on the base at model_path
    tokenizer.save_pretrained(out / "final")
    return {"step_ends": [t - STARTED for t in ends]}


STARTED = time.perf_counter()  # the worker process's own start (imports included, as a user's run pays them)


def worker(args: argparse.Namespace) -> None:
    data, out, lora = Path(args.data), Path(args.out), args.adapter == "lora"
    if args.worker == "trl":
        result = run_trl(args.model, data, out, args.precision == "bf16", lora)
    else:
        result = run_alignkit(args.model, data, out, args.precision, packing=args.worker == "alignkit", lora=lora)
    report(result, STARTED)


@torch.no_grad()
def dpo_loss_on(model_dir: Path, init_path: str, data: Path) -> float:
    """Mean DPO loss of a trained model on the pairs, reference = the initial model; same code for both."""
    from alignkit.algos.dpo import (
        DPOConfig,
        _split,
        collate_pairs,
        make_objective,
        pair_logps,
        reference_logps,
    )
    from alignkit.data import preference_example, read_examples
    from alignkit.logprobs import LogprobModel
    from alignkit.models import load_model

    init, tokenizer = load_model(init_path)
    examples = read_examples(str(data), preference_example, tokenizer, 128)
    items = reference_logps(LogprobModel(init), examples, tokenizer.pad_token_id, contextlib.nullcontext)
    trained, _ = load_model(str(model_dir))
    objective = make_objective(DPOConfig())
    total = 0.0
    for start in range(0, len(items), 16):
        batch = collate_pairs(items[start : start + 16], tokenizer.pad_token_id)
        logps, lengths = pair_logps(LogprobModel(trained), batch)
        total += float(objective(_split(logps, lengths, batch))[0].sum())
    return total / len(items)


def flop_bounds(model_path: str, data: Path, gflops: float, lora: bool = False) -> dict[str, float]:
    """Seconds nothing can go below at ``gflops``: ``step`` a steady step's policy forward + backward (real tokens,
    each pair's prompt twice; LM head at response tokens; with ``lora`` no weight gradients), ``step_shared`` the
    same with each prompt once, and ``epoch`` the whole epoch plus one reference forward of the same tokens."""
    from flops import linear_params, train_flops

    from alignkit.data import preference_example, read_examples
    from alignkit.models import load_model

    model, tokenizer = load_model(model_path)
    examples = read_examples(str(data), preference_example, tokenizer, 128)
    prompts = sum(len(e.prompt_ids) for e in examples)
    responses = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    body, head = linear_params(model)
    steps = -(-len(examples) // 8)
    rate = gflops * 1e9
    grads = not lora
    return {"step": train_flops(body, head, 2 * prompts + responses, responses, weight_grads=grads) / steps / rate,
            "step_shared": train_flops(body, head, prompts + responses, responses, weight_grads=grads) / steps / rate,
            "epoch": train_flops(body, head, 2 * prompts + responses, responses, 2 * prompts + responses, responses,
                                 weight_grads=grads) / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--lora", action="store_true", help="both sides train a LoRA adapter (rank 16, alpha 32)")
    arm_arguments(parser, ["alignkit", "alignkit-padded", "trl"],
                  hidden=("--model", "--data", "--out", "--precision", "--adapter"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs)))
    rates = machine_rates(args.threads)
    for name in args.models.split(","):
        path = model_path(name, work)
        for precision in rates:
            label = "bf16" if precision == "bf16" else "fp32"
            kinds = ["alignkit", "alignkit-padded"] + ([] if args.skip_trl else ["trl"])

            adapter = "lora" if args.lora else "full"
            results = run_arms(__file__, kinds, args.repeat, args.threads, work, f"{name} {label}", model=path, data=data,
                               precision=precision, adapter=adapter)
            refresh_rates(rates)
            bound = flop_bounds(path, data, rates[precision], args.lora)
            ours = results["alignkit"]
            tuning = f"LoRA r{LORA_R}/alpha {LORA_ALPHA} on every linear" if args.lora else "full fine-tune"
            print(f"\n[{name}, {label}] {args.pairs} pairs, batch 8, 1 epoch, {tuning}. FLOP bound at {rates[precision]:.0f} "
                  f"GFLOP/s: steady step {bound['step']:.2f} s (prompt once: {bound['step_shared']:.2f} s), "
                  f"epoch with reference {bound['epoch']:.1f} s")
            print(f"{'run':<26} {'end to end':>10} {'start-up':>9} {'step':>7} {'step/bound':>10} {'e2e/bound':>9} "
                  f"{'peak RSS':>9} {'CPU':>7} {'load':>5} {'vs alignkit':>11}")
            for kind, r in results.items():
                who = {"alignkit": "alignkit (padding-free)", "alignkit-padded": "alignkit --no-packing",
                       "trl": "TRL DPOTrainer (best)"}[kind]
                print(f"{who:<26} {r['total_s']:9.1f}s {r['startup_s']:8.1f}s {r['step_s']:6.2f}s "
                      f"{r['step_s'] / bound['step']:9.2f}x {r['total_s'] / bound['epoch']:8.2f}x "
                      f"{r['peak_rss_mb']:7.0f}MB {r['cpu_s']:6.0f}s {r['load']:5.1f} {r['total_s'] / ours['total_s']:10.2f}x")
            print_rounds(results, args.repeat)
            record("dpo-lora" if args.lora else "dpo", model=name, precision=label, gflops=rates[precision],
                   bound_step=bound["step"], bound_step_shared=bound["step_shared"], bound_epoch=bound["epoch"],
                   **arm_figures(results))
            losses = {kind: dpo_loss_on(r["out"] / "final", path, data) for kind, r in results.items()}
            print("DPO loss on the pairs after one epoch (start 0.6931): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    print(f"machine load at the end: {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
