"""Rollout speed: alignkit.rollout.sample against Hugging Face `generate`, side by side, on SmolLM2-135M.

    .venv/bin/python bench/bench_rollout.py [--repeats 3] [--threads N] [--bf16 auto|on|off]

Workloads (real chat prompts from alignkit/bundled/instructions_train.jsonl, chat template applied):
  b64x32  64 distinct prompts x 32 new tokens
  b8x48    8 distinct prompts x 48 new tokens
  grpo    16 prompts x 4 samples each (batch 64) x 32 new tokens, as GRPO/RLOO sample them
Every engine samples (temperature 1, top-p 1) with `min_new_tokens = max_new_tokens`, which bans EOS until
the cap in both HF (MinNewTokensLengthLogitsProcessor) and alignkit: every run makes exactly B x T tokens.
tokens/s = B x T / wall time of the whole call (prefill included). alignkit bf16 starts from the fp32
model (what an RL loop holds), so its time includes converting the weights.
Runs are interleaved and repeated (the machine is shared); the table shows medians.
Then a correctness check: greedy alignkit fp32 against HF generate(do_sample=False) fp32 on real prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from alignkit.models import load_model
from alignkit.rollout import SamplingConfig, sample

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "alignkit" / "bundled" / "instructions_train.jsonl"
WORKLOADS = {"b64x32": (64, 1, 32), "b8x48": (8, 1, 48), "grpo": (16, 4, 32)}  # prompts, samples each, T


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    prompts = []
    for row in rows[:n]:
        ids = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_runner(model, tokenizer, prompts, new_tokens):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        return out.shape[0] * (out.shape[1] - ids.shape[1])

    return run


def alignkit_runner(model, tokenizer, prompts, new_tokens, dtype):
    config = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, dtype=dtype)

    def run() -> int:
        rollout = sample(model, prompts, config, tokenizer=tokenizer)
        return int(rollout.response_mask.sum())

    return run


def greedy_check(model, tokenizer, n_prompts: int = 4, new_tokens: int = 32) -> tuple[int, int]:
    """How many alignkit fp32 greedy responses equal HF's greedy ones (tokens up to and including EOS)."""
    prompts = chat_prompts(tokenizer, 200)[-n_prompts:]
    eos = tokenizer.eos_token_id
    config = SamplingConfig(max_new_tokens=new_tokens, greedy=True, dtype="fp32")
    rollout = sample(model, prompts, config, tokenizer=tokenizer)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    equal = 0
    for b, hf in enumerate(out[:, ids.shape[1]:].tolist()):
        hf = hf[: hf.index(eos) + 1] if eos in hf else hf
        ours = rollout.response_ids[b, : int(rollout.response_mask[b].sum())].tolist()
        equal += hf == ours
    first = rollout.response_ids[0][rollout.response_mask[0].bool()]
    print("first greedy reply:", repr(tokenizer.decode(first)))
    return equal, len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bench bf16 engines (auto: only if this CPU has native bf16 matmuls)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 matmul: {native_bf16}")
    if not use_bf16:
        print("bf16 engines skipped: without native bf16 this CPU runs bf16 matmuls several times slower "
              "than fp32 (--bf16 on to run them anyway)")

    model, tokenizer = load_model("smollm2-135m", dtype="fp32")
    model_bf16 = load_model("smollm2-135m", dtype="bf16")[0] if use_bf16 else None
    all_prompts = chat_prompts(tokenizer, 64)

    for name in args.workloads.split(","):
        n_prompts, n_samples, new_tokens = WORKLOADS[name]
        prompts = [p for p in all_prompts[:n_prompts] for _ in range(n_samples)]
        lengths = sorted(map(len, prompts))
        print(f"\n== {name}: batch {len(prompts)} x {new_tokens} new tokens, prompt lengths "
              f"{lengths[0]}..{lengths[-1]} (median {lengths[len(lengths) // 2]})")
        engines = {"HF generate fp32": hf_runner(model, tokenizer, prompts, new_tokens)}
        if use_bf16:
            engines["HF generate bf16"] = hf_runner(model_bf16, tokenizer, prompts, new_tokens)
        engines["alignkit fp32"] = alignkit_runner(model, tokenizer, prompts, new_tokens, "fp32")
        if use_bf16:
            engines["alignkit bf16"] = alignkit_runner(model, tokenizer, prompts, new_tokens, "bf16")
        speeds: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.repeats):
            for label, run in engines.items():
                start = time.perf_counter()
                tokens = run()
                elapsed = time.perf_counter() - start
                assert tokens == len(prompts) * new_tokens, (label, tokens)
                speeds[label].append(tokens / elapsed)
        medians = {k: statistics.median(v) for k, v in speeds.items()}
        for label, speed in medians.items():
            ratios = f"x{speed / medians['HF generate fp32']:.2f} vs HF fp32"
            if "HF generate bf16" in medians:
                ratios += f", x{speed / medians['HF generate bf16']:.2f} vs HF bf16"
            runs = " ".join(f"{s:.1f}" for s in speeds[label])
            print(f"  {label:18s} {speed:7.1f} tokens/s  ({ratios})   runs: {runs}")

    equal, total = greedy_check(model, tokenizer)
    print(f"\ngreedy fp32, alignkit vs HF generate: {equal}/{total} sequences identical")


if __name__ == "__main__":
    main()
