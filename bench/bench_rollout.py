"""Rollout speed: alignkit.rollout.sample against Hugging Face `generate`, side by side, in one run.

    .venv/bin/python bench/bench_rollout.py [--models smollm2,tiny] [--repeats 3] [--threads N] [--bf16 auto|on|off]
                                            [--workloads b64x32,b8x48,grpo]

Workloads (real chat prompts from alignkit/bundled/instructions_train.jsonl, chat template applied):
  b64x32  64 distinct prompts x 32 new tokens
  b8x48    8 distinct prompts x 48 new tokens
  grpo    16 prompts x 4 samples each (batch 64) x 32 new tokens, as GRPO/RLOO sample them
Every engine samples (temperature 1, top-p 1) with `min_new_tokens = max_new_tokens`, which bans EOS until
the cap in both HF (MinNewTokensLengthLogitsProcessor) and alignkit: every run makes exactly B x T tokens.
Engines: alignkit fp32 and HF generate fp32 always; where the CPU has native bf16 (or with --bf16 on) also HF
generate bf16 (HF's best there) and alignkit bf16, which starts from the fp32 model (what an RL loop holds), so
its time includes converting the weights. Models: SmolLM2-135M-Instruct and the tiny 2-layer, 128-wide llama with
the SmolLM2 vocabulary (random weights: a smoke test of the script, not a speed claim).

Printed per workload and engine: tokens/s = B x T / wall time of the whole call (prefill included), the median
call time, the call's FLOP bound (``flops.online_step_flops``: prefill of each distinct prompt once, a prefix common
to all prompts once, plus body + head at every fed-back token; the minimum any engine must compute, whatever it
does) at this machine's measured matmul rate for the engine's dtype, time/bound, and memory. A call measures
throughput, not a training run, so every engine runs in this one process, interleaved and repeated (the machine
is shared; medians are shown); memory is per call all the same: before each call the process's peak RSS is
reset (Linux /proc/self/clear_refs), so "peak RSS" is the process's high-water mark during that engine's calls
(models already loaded included) and "+call" what the call added on top of the RSS it started from.
Then a correctness check: greedy alignkit fp32 against HF generate(do_sample=False) fp32 on real prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flops import distinct_prompt_tokens, linear_params, matmul_gflops, model_path, online_step_flops, record

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


def rss_mb() -> tuple[float, float]:
    """(current, peak since the last reset) resident set of this process, MB."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))


def reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed_call(run) -> tuple[float, int, float, float]:
    """(seconds, tokens, peak RSS MB during the call, MB the call added to the RSS it started from)."""
    can_reset = reset_peak()
    before = rss_mb()[0] if can_reset else 0.0
    start = time.perf_counter()
    tokens = run()
    elapsed = time.perf_counter() - start
    peak = rss_mb()[1] if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return elapsed, tokens, peak, (peak - before) if can_reset else float("nan")


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


def bench_model(name: str, path: str, args, use_bf16: bool, rates: dict[str, float]) -> None:
    model, tokenizer = load_model(path, dtype="fp32")
    model_bf16 = load_model(path, dtype="bf16")[0] if use_bf16 else None
    body, head = linear_params(model)
    all_prompts = chat_prompts(tokenizer, 64)
    print(f"\n##### {name}: {body / 1e6:.1f}M body + {head / 1e6:.1f}M head weights in linear layers")

    for workload in args.workloads.split(","):
        n_prompts, n_samples, new_tokens = WORKLOADS[workload]
        prompts = [p for p in all_prompts[:n_prompts] for _ in range(n_samples)]
        lengths = sorted(map(len, prompts))
        prompt_tokens, distinct = distinct_prompt_tokens(prompts)
        flop = online_step_flops(body, head, prompt_tokens, distinct, len(prompts), len(prompts) * new_tokens)[0]
        print(f"\n== {name} {workload}: batch {len(prompts)} x {new_tokens} new tokens, prompt lengths "
              f"{lengths[0]}..{lengths[-1]} (median {lengths[len(lengths) // 2]}; {prompt_tokens} tokens in the "
              f"distinct prompts, common prefix once); {flop / 1e9:.1f} GFLOP per call; "
              f"load average {os.getloadavg()[0]:.1f}")
        engines = {"HF generate fp32": hf_runner(model, tokenizer, prompts, new_tokens)}
        if use_bf16:
            engines["HF generate bf16"] = hf_runner(model_bf16, tokenizer, prompts, new_tokens)
        engines["alignkit fp32"] = alignkit_runner(model, tokenizer, prompts, new_tokens, "fp32")
        if use_bf16:
            engines["alignkit bf16"] = alignkit_runner(model, tokenizer, prompts, new_tokens, "bf16")
        calls: dict[str, list[tuple[float, int, float, float]]] = {k: [] for k in engines}
        for _ in range(args.repeats):
            for label, run in engines.items():
                call = timed_call(run)
                assert call[1] == len(prompts) * new_tokens, (label, call[1])
                calls[label].append(call)
        seconds = {k: statistics.median(c[0] for c in v) for k, v in calls.items()}
        best_hf = min((k for k in seconds if k.startswith("HF")), key=seconds.get)
        print(f"  {'engine':<18} {'tokens/s':>9} {'call':>7} {'bound':>7} {'time/bound':>10} {'peak RSS':>9} "
              f"{'+call':>7} {'vs HF fp32':>10} {'vs HF best':>10}   runs (tokens/s)")
        for label, secs in seconds.items():
            bound = flop / (rates["bf16" if "bf16" in label else "fp32"] * 1e9)
            tokens = len(prompts) * new_tokens
            peak = max(c[2] for c in calls[label])
            added = max(c[3] for c in calls[label])
            runs = " ".join(f"{tokens / c[0]:.1f}" for c in calls[label])
            print(f"  {label:<18} {tokens / secs:9.1f} {secs:6.2f}s {bound:6.3f}s {secs / bound:9.1f}x "
                  f"{peak:7.0f}MB {added:5.0f}MB {seconds['HF generate fp32'] / secs:9.2f}x "
                  f"{seconds[best_hf] / secs:9.2f}x   {runs}")
        print(f"  (HF best here: {best_hf})")
        record("rollout", model=name, workload=workload, tokens=len(prompts) * new_tokens, bound={k: flop / (rates["bf16" if "bf16" in k else "fp32"] * 1e9) for k in seconds},
               tokens_per_s={k: len(prompts) * new_tokens / v for k, v in seconds.items()})

    equal, total = greedy_check(model, tokenizer)
    print(f"\n[{name}] greedy fp32, alignkit vs HF generate: {equal}/{total} sequences identical")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2", help="smollm2, tiny (or a model name/path), comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bench bf16 engines (auto: only if this CPU has native bf16 matmuls)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown or args.repeats < 1:
        parser.error(f"--workloads: expected some of {', '.join(WORKLOADS)}; --repeats: at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    rates = {"fp32": matmul_gflops(torch.float32)}
    if use_bf16:
        rates["bf16"] = matmul_gflops(torch.bfloat16)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, native bf16 matmul: "
          f"{native_bf16}, matmul " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
          + f"; load average {os.getloadavg()[0]:.1f}")
    if not use_bf16:
        print("bf16 engines skipped: without native bf16 this CPU runs bf16 matmuls several times slower "
              "than fp32 (--bf16 on to run them anyway)")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        for name in args.models.split(","):
            bench_model(name, model_path(name, Path(tmp)), args, use_bf16, rates)
    print(f"\nmachine load at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
