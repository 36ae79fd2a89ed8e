"""alignkit DPO vs TRL's DPOTrainer, side by side in one run, on the same pairs, model and hyperparameters.

    .venv/bin/python bench/bench_dpo.py [--models smollm2,tiny] [--pairs 64]

Workload (issue #3): 64 preference pairs, batch 8, max length 128, one epoch, full fine-tune, on SmolLM2-135M
and on a tiny 2-layer/128-wide llama with the SmolLM2 vocabulary. TRL runs at its fastest setting on this
machine (no gradient checkpointing; bf16 only where the CPU has native bf16, as for alignkit). Prints wall
time, pairs/s, peak RSS and the ratio, and checks that both trained models reach the same DPO loss on the
training pairs (each evaluated by the same code against the same initial reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from flops import matmul_gflops

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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_alignkit(model_path: str, data: Path, out: Path, precision: str) -> float:
    from alignkit.algos import dpo
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig

    cfg = dpo.DPOConfig(
        model=ModelConfig(model=model_path),
        data=DataConfig(data=str(data), max_length=128),
        train=TrainConfig(output_dir=str(out), epochs=1, batch_size=8, lr=5e-6, schedule="linear",
                          warmup_ratio=0.0, mixed_precision=precision, report_to="none", progress=False),
    )
    start = time.perf_counter()
    dpo.train(cfg)
    return time.perf_counter() - start


def run_trl(model_path: str, data: Path, out: Path, bf16: bool) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=5e-6,
                     lr_scheduler_type="linear", max_length=128, gradient_checkpointing=False, bf16=bf16,
                     logging_steps=1, report_to=[], save_strategy="no", beta=0.1, use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return time.perf_counter() - start


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
    items = reference_logps(init, examples, tokenizer.pad_token_id, contextlib.nullcontext)
    trained, _ = load_model(str(model_dir))
    objective = make_objective(DPOConfig())
    total = 0.0
    for start in range(0, len(items), 16):
        batch = collate_pairs(items[start : start + 16], tokenizer.pad_token_id)
        logps, lengths = pair_logps(LogprobModel(trained), batch)
        total += float(objective(_split(logps, lengths, batch))[0].sum())
    return total / len(items)


def flop_bound(model_path: str, data: Path, gflops: float) -> tuple[float, float]:
    """(TFLOP, seconds) that one epoch cannot go below: policy forward + backward over every real token (LM head
    at response tokens only), plus one reference forward of the same tokens."""
    from flops import linear_params, train_flops

    from alignkit.data import preference_example, read_examples
    from alignkit.models import load_model

    model, tokenizer = load_model(model_path)
    examples = read_examples(str(data), preference_example, tokenizer, 128)
    tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    responses = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    body, head = linear_params(model)
    flop = train_flops(body, head, tokens, responses, tokens, responses)
    return flop / 1e12, flop / (gflops * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()
    from alignkit.models import bf16_is_fast, resolve, tiny_causal_lm

    bf16 = bf16_is_fast()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs)))
    gflops = matmul_gflops(torch.bfloat16 if bf16 else torch.float32)
    print(f"threads {torch.get_num_threads()}, bf16 {'on' if bf16 else 'off (no native bf16 on this CPU)'}, "
          f"matmul {gflops:.0f} GFLOP/s")
    for name in args.models.split(","):
        if name == "tiny":
            model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=128)
            path = work / "tiny"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            path = str(path)
        else:
            path = resolve("smollm2-135m")
        t_ours = run_alignkit(path, data, work / f"ours-{name}", "bf16" if bf16 else "no")
        rss_ours = peak_rss_mb()
        print(f"[{name}] alignkit done in {t_ours:.1f} s", flush=True)
        t_trl = run_trl(path, data, work / f"trl-{name}", bf16)
        print(f"[{name}] TRL done in {t_trl:.1f} s", flush=True)
        rss_both = peak_rss_mb()
        loss_ours = dpo_loss_on(work / f"ours-{name}" / "final", path, data)
        loss_trl = dpo_loss_on(work / f"trl-{name}" / "final", path, data)
        print(f"[{name}] alignkit {t_ours:7.1f} s ({args.pairs / t_ours:5.2f} pairs/s, peak RSS {rss_ours:.0f} MB) | "
              f"TRL best {t_trl:7.1f} s ({args.pairs / t_trl:5.2f} pairs/s, peak RSS so far {rss_both:.0f} MB) | "
              f"speed-up {t_trl / t_ours:4.2f}x")
        tflop, bound = flop_bound(path, data, gflops)
        print(f"[{name}] FLOP bound: {tflop:.2f} TFLOP = {bound:.1f} s at {gflops:.0f} GFLOP/s; "
              f"alignkit {t_ours / bound:.1f}x the bound, TRL {t_trl / bound:.1f}x")
        print(f"[{name}] DPO loss on the pairs after one epoch (start 0.6931): alignkit {loss_ours:.4f}, TRL {loss_trl:.4f}, "
              f"|diff| {abs(loss_ours - loss_trl):.4f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
