"""Rollout speed, vLLM against alignkit's sampler, on bench_rollout.py's workloads with SmolLM2-135M.

    .venv-vllm/bin/python bench/bench_vllm.py [--repeats 2] [--dtype auto|float32|bfloat16] [--compile]
    (make bench-vllm; vLLM lives in .venv-vllm, see the Makefile)

Both back ends sample at temperature 1, top-p 1, with EOS banned until the cap (alignkit's min_new_tokens, vLLM's
min_tokens), so each call makes exactly B x T tokens; tokens/s = B x T / wall time of the call (prefill included).
vLLM runs as ``--generator vllm`` runs it (alignkit.generation.vllm.VLLMSampler): colocated, in this process,
with the policy's weights pushed before the call; the push is timed apart, and so is the engine's start-up
(``enforce_eager`` unless ``--compile``). alignkit's model is frozen, so its sampler packs the weights once (timed
apart too) instead of in every call as for a policy in training: both show steady throughput. Peak RSS is the process's high-water mark (getrusage) after the builtin
runs and again after vLLM's. Runs are interleaved (the machine is shared); medians are shown.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import WORKLOADS, chat_prompts  # noqa: E402
from flops import record  # noqa: E402

from alignkit.models import DTYPES, load_model  # noqa: E402
from alignkit.rollout import SamplingConfig, _decoder, sample  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="both samplers' dtype; auto: bfloat16 on a CPU with native bf16, else float32 (what "
                             "alignkit's sampler picks by default, and the faster of the two for vLLM)")
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (no enforce_eager): slower start")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    from alignkit.generation.vllm import VLLMSampler
    from alignkit.models import bf16_is_fast

    if args.dtype == "auto":
        args.dtype = "bfloat16" if bf16_is_fast() else "float32"
    ours = "bf16" if args.dtype == "bfloat16" else "fp32"

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 matmul: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    model, tokenizer = load_model("smollm2-135m", dtype="fp32")
    all_prompts = chat_prompts(tokenizer, 64)
    jobs = []
    for name in args.workloads.split(","):
        n_prompts, n_samples, new_tokens = WORKLOADS[name]
        prompts = [p for p in all_prompts[:n_prompts] for _ in range(n_samples)]
        jobs.append((name, prompts, SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, dtype=ours)))

    # Steady throughput, as vLLM's is measured: weights fixed between calls. Frozen, the model keeps its packed
    # copy across calls (made once, like vLLM's weight push, and timed apart like it); a policy in training
    # repacks in every call, which costs the pack time below once per call.
    model.requires_grad_(False)
    start = time.perf_counter()
    _decoder(model, DTYPES[ours])
    pack = time.perf_counter() - start
    # builtin first, alone, for its own peak RSS
    sample(model, jobs[0][1][:2], SamplingConfig(max_new_tokens=2, dtype=ours), tokenizer=tokenizer)  # warm-up
    builtin_rss = peak_rss_gb()
    start = time.perf_counter()
    sampler = VLLMSampler(model, tokenizer, max_model_len=512, dtype=args.dtype, enforce_eager=not args.compile,
                          follow_updates=False)
    startup = time.perf_counter() - start
    pushes = []
    for _ in range(3):
        start = time.perf_counter()
        sampler.push()
        pushes.append(time.perf_counter() - start)
    sampler(jobs[0][1][:2], SamplingConfig(max_new_tokens=2))  # warm-up
    print(f"vLLM engine start-up {startup:.1f} s (enforce_eager={not args.compile}, dtype {args.dtype}); "
          f"weight push {statistics.median(pushes):.2f} s (median of 3; 135M parameters); alignkit's weight "
          f"packing {pack:.2f} s; neither is in the calls below")

    for name, prompts, config in jobs:
        want = len(prompts) * config.max_new_tokens
        speeds: dict[str, list[float]] = {f"alignkit {ours}": [], f"vLLM {args.dtype}": []}
        for repeat in range(args.repeats):
            for label in speeds:
                generator = torch.Generator().manual_seed(repeat)
                start = time.perf_counter()
                if label.startswith("alignkit"):
                    rollout = sample(model, prompts, config, tokenizer=tokenizer, generator=generator)
                else:
                    rollout = sampler(prompts, config, generator)
                elapsed = time.perf_counter() - start
                assert int(rollout.response_mask.sum()) == want, (label, int(rollout.response_mask.sum()), want)
                speeds[label].append(want / elapsed)
        lengths = sorted(map(len, prompts))
        print(f"\n== {name}: batch {len(prompts)} x {config.max_new_tokens} new tokens, prompt lengths "
              f"{lengths[0]}..{lengths[-1]}")
        base = statistics.median(speeds[f"alignkit {ours}"])
        for label, runs in speeds.items():
            speed = statistics.median(runs)
            print(f"  {label:16s} {speed:7.1f} tokens/s  (x{speed / base:.2f})   runs: "
                  + " ".join(f"{s:.1f}" for s in runs))
        record("vllm", workload=name, startup_s=startup, push_s=statistics.median(pushes), pack_s=pack, tokens_per_s={k: statistics.median(v) for k, v in speeds.items()})
    print(f"\npeak RSS: {builtin_rss:.2f} GB with the builtin sampler alone, {peak_rss_gb():.2f} GB with vLLM "
          f"colocated (its KV cache reservation included)")
    sampler.close()


if __name__ == "__main__":
    main()
