"""FLOP bounds for the benchmarks: the matmul work a step cannot avoid, and this machine's measured matmul rate.

A decoder token costs 2·N_body multiply-adds forward (N_body = the weights of the linear layers of the blocks),
plus 2·N_head at positions where the LM head is needed; backward costs twice the forward. Attention scores and
element-wise work are left out (small at these lengths), so the bound is optimistic: nothing can beat it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def linear_params(model) -> tuple[int, int]:
    """(body, head) weight counts: 2-D weights of the blocks, and the LM head (vocab x hidden)."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    return body, head


def train_flops(body: int, head: int, tokens: int, head_tokens: int, frozen_tokens: int = 0,
                frozen_head_tokens: int = 0, weight_grads: bool = True) -> float:
    """Forward + backward over ``tokens`` (head at ``head_tokens``), plus forward-only passes (reference). The
    backward costs 4 FLOPs per weight and token (input and weight gradients), 2 when the weights are frozen
    (``weight_grads`` False: LoRA, whose adapters' own FLOPs are negligible at rank << hidden)."""
    train = 6.0 if weight_grads else 4.0
    return train * (body * tokens + head * head_tokens) + 2.0 * (body * frozen_tokens + head * frozen_head_tokens)


def online_step_flops(body: int, head: int, prompt_tokens: int, prompts: int, rows: int, generated: int,
                      reference: bool = True, old_forward: bool = False, epochs: int = 1,
                      weight_grads: bool = True) -> tuple[float, float]:
    """(sampling, update) FLOPs of one online-RL step (GRPO, RLOO, PPO): ``rows`` responses to ``prompts``
    distinct prompts of ``prompt_tokens`` tokens in all (each prompt counted once, see ``distinct_prompt_tokens``),
    ``generated`` response tokens in all (EOS included).

    sampling = 2·(N_body·P + N_head·n_prompts) + 2·(N_body + N_head)·(G − B)
        prefill: each distinct prompt once (alignkit.rollout runs a prompt repeated in the batch, a GRPO group,
        once, and a prefix common to all prompts, e.g. a chat template's system turn, once), the head at its last
        position only (the first token's distribution, the same for every row of the group); decode: every
        generated token but each row's last is fed back, through the body and then the head (the next token's
        distribution). P = prompt_tokens, G = generated, B = rows.
    update = epochs·6·(N_body·S + N_head·G) + (reference + old_forward)·2·(N_body·S + N_head·G)
        policy forward + backward per pass over the rollout, and forward-only passes for the reference
        (β > 0) and the "old" log-probs (when the trainer recomputes them), each over S = P + G − B body
        positions (the prompt once per group, as alignkit.logprobs.backbone_hidden shares it; a row's last
        token predicts nothing) with the head at the G positions whose next token is a response token. Without
        ``weight_grads`` (LoRA: the weights are frozen) a forward + backward costs 4 instead of 6 per weight and token.

    Hand check: body 10, head 100, one 3-token prompt, 2 rows of 2 tokens each (G = 4), reference, 1 epoch:
    sampling = 2·(10·3 + 100·1) + 2·110·(4 − 2) = 700; S = 3 + 4 − 2 = 5, update = 8·(10·5 + 100·4) = 3600.
    """
    sampling = 2.0 * (body * prompt_tokens + head * prompts) + 2.0 * (body + head) * (generated - rows)
    seen = prompt_tokens + generated - rows
    train = 6.0 if weight_grads else 4.0
    update = (train * epochs + 2.0 * (int(reference) + int(old_forward))) * (body * seen + head * generated)
    return sampling, update


def distinct_prompt_tokens(prompts: list[list[int]]) -> tuple[int, int]:
    """(tokens, count) of the distinct prompts among ``prompts``, their longest common prefix counted once (as
    alignkit.rollout's prefill runs it; kept a token short of the shortest prompt, as there)."""
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    common = min(map(len, distinct)) - 1
    for i in range(common):
        if any(p[i] != distinct[0][i] for p in distinct):
            common = i
            break
    return common + sum(len(p) - common for p in distinct), len(distinct)


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 2.0) -> float:
    """Best sustained rate of a square matmul on this machine, all torch threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


MATMULS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm", "_linear_pointwise")


def matmul_floor(step, repeats: int = 3) -> tuple[float, float, int]:
    """(seconds, FLOPs, calls) of the matrix multiplies ``step()`` runs, each replayed alone on fresh tensors of the
    same shapes, strides and dtype, best of ``repeats``: the time this machine's BLAS needs for exactly this step's
    matmuls, with nothing else in the way. A step cannot beat it; the gap between it and the FLOP bound (every
    matmul at the 1024-square rate) is what the shapes cost, not the code. Products with a weight packed for oneDNN
    (``alignkit.packing``: the LM head of the training log-probs, the sampler, reference passes) are replayed
    packed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alignkit import packing

    calls: dict[tuple, int] = {}

    def spec(a):
        if isinstance(a, list):  # _linear_pointwise's scalar list: hashable on record, a list again on replay
            return ("list", tuple(a))
        if not isinstance(a, torch.Tensor):
            return a
        if a.is_mkldnn:  # a packed weight: its (out, in) shape and dtype, repacked on replay
            return ("packed", tuple(a.shape), a.dtype)
        return (tuple(a.shape), a.stride(), a.dtype)

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in MATMULS:
                key = (func, tuple(spec(a) for a in args), tuple(sorted((kwargs or {}).items())))
                calls[key] = calls.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    with Log():
        step()

    def like(spec):  # a fresh tensor laid out as the logged one (a transposed view stays transposed)
        if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "list":
            return list(spec[1])
        if isinstance(spec, tuple) and len(spec) == 3 and spec[0] == "packed":
            return packing.pack(torch.randn(spec[1]).to(spec[2]))
        if not (isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[2], torch.dtype)):
            return spec
        shape, stride, dtype = spec
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
        return torch.randn(size).to(dtype).as_strided(shape, stride)

    seconds = flops = 0.0
    for (func, spec_, kw), count in calls.items():
        args = [like(a) for a in spec_]
        func(*args, **dict(kw))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            func(*args, **dict(kw))
            best = min(best, time.perf_counter() - start)
        if func.__name__.startswith("_linear_pointwise"):  # x (..., in) · packed (out, in)ᵀ
            x, (out_features, in_features) = args[0], spec_[1][1]
            flops += count * 2.0 * x.shape[:-1].numel() * in_features * out_features
        else:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            flops += count * 2.0 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
        seconds += count * best
    return seconds, flops, sum(calls.values())


def model_path(name: str, root) -> str:
    """A directory every bench arm can load: the tiny 2-layer llama saved once under ``root``, or the cached
    SmolLM2 import (``smollm2``; any other name or path as ``alignkit.models.resolve`` reads it)."""
    from alignkit.models import resolve, tiny_causal_lm

    if name != "tiny":
        return resolve("smollm2-135m" if name == "smollm2" else name)
    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=128)
    path = root / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


RECORD_ENV = "ALIGNKIT_BENCH_RECORD"


def record(bench: str, **values) -> None:
    """Append ``{"bench": bench, **values}`` as one JSON line to the file ``$ALIGNKIT_BENCH_RECORD`` names, if set:
    ``bench/targets.py`` runs the benches with it and reads their figures back. Without it, nothing."""
    path = os.environ.get(RECORD_ENV)
    if path:
        from alignkit.models import bf16_is_fast

        machine = {"native_bf16": bf16_is_fast(), "cpu": cpu_name(), "threads": torch.get_num_threads()}
        with open(path, "a") as f:
            f.write(json.dumps({"bench": bench, **machine, **values}) + "\n")


def arm_figures(results: dict[str, dict], fields=(("e2e", "total_s"), ("step", "step_s"))) -> dict[str, float]:
    """Each arm's figures for ``record``, named ``{arm}_{field}`` (``alignkit_padded_step`` for the arm
    ``alignkit-padded``'s ``step_s``), the names ``bench/targets.py`` reads."""
    return {f"{kind.replace('-', '_')}_{name}": r[key] for kind, r in results.items() for name, key in fields}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


# precision -> every matmul rate measured in this bench so far: at the start, after each arm (``run_worker``), at the end
SAMPLED_RATES: dict[str, list[float]] = {}


def _rate(precision: str, seconds: float = 2.0) -> float:
    return matmul_gflops(torch.bfloat16 if precision == "bf16" else torch.float32, seconds=seconds)


def machine_rates(threads: int = 0) -> dict[str, float]:
    """Precision -> measured matmul GFLOP/s at the runs' thread count ("no" = fp32 always; "bf16" too where the
    CPU has native bf16); prints the one-line machine header every training bench starts with."""
    from alignkit.models import bf16_is_fast

    bf16 = bf16_is_fast()
    if threads:
        torch.set_num_threads(threads)
    rates = {p: _rate(p) for p in (["bf16", "no"] if bf16 else ["no"])}
    SAMPLED_RATES.clear()
    SAMPLED_RATES.update({p: [r] for p, r in rates.items()})
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, bf16 "
          f"{'native' if bf16 else 'emulated: off (no native bf16 on this CPU)'}, matmul "
          + ", ".join(f"{'bf16' if p == 'bf16' else 'fp32'} {r:.0f} GFLOP/s" for p, r in rates.items())
          + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
    return rates


def refresh_rates(rates: dict[str, float]) -> dict[str, float]:
    """Measure the matmul rates again after the runs and keep the highest of every measurement (the start, after
    each arm, now): on a shared (virtual) machine the rate swings with the neighbours' load within minutes, noise
    only ever lowers it, and a bound taken at a low moment would flatter every run."""
    for precision, before in rates.items():
        now = _rate(precision)
        seen = SAMPLED_RATES.setdefault(precision, [before])
        between = seen[1:]
        seen.append(now)
        rates[precision] = max(before, *seen)
        print(f"matmul {'bf16' if precision == 'bf16' else 'fp32'} re-measured after the runs: {now:.0f} GFLOP/s "
              f"(before {before:.0f}" + (f"; after each arm {' '.join(f'{r:.0f}' for r in between)}" if between else "")
              + f"); the bounds use {rates[precision]:.0f}", flush=True)
    return rates


def run_worker(command: list[str], threads: int = 0) -> dict:
    """Run one bench arm in its own process (so its peak RSS is its own) and read its ``RESULT {json}`` line; adds
    the median steady step ``step_s`` (from the worker's ``step_ends``), ``steps``, the mean load average, and
    ``gflops``: the matmul rate measured right after it (1 s per precision, kept in SAMPLED_RATES)."""
    load = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    ends = result["step_ends"]
    result["step_s"] = statistics.median([b - a for a, b in zip(ends, ends[1:])]) if len(ends) > 1 else ends[0]
    result["steps"] = len(ends)
    result["load"] = (load + os.getloadavg()[0]) / 2
    result["gflops"] = {precision: _rate(precision, seconds=1.0) for precision in SAMPLED_RATES}
    for precision, rate in result["gflops"].items():
        SAMPLED_RATES[precision].append(rate)
    return result


def alternate(kinds: list[str], repeat: int, run) -> dict[str, dict]:
    """``run(kind, round)`` for every kind, ``repeat`` rounds with the kinds alternating, so a neighbour's load on
    this shared VM (its matmul rate swings 84-168 GFLOP/s within minutes) falls on every arm alike. Per kind the run
    with the fastest steady step is kept (noise only ever adds time), with every round's step in ``step_s_all``."""
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for round_ in range(repeat):
        for kind in kinds:
            runs[kind].append(run(kind, round_))
    kept = {}
    for kind, results in runs.items():
        best = dict(min(results, key=lambda r: r["step_s"]))
        best["step_s_all"] = [r["step_s"] for r in results]
        kept[kind] = best
    return kept


# ------------------------------------------------------------------------------ the training benches' harness
def arm_arguments(parser, workers: list[str], hidden: tuple[str, ...] = ("--model", "--data", "--out", "--precision"),
                  models: str = "tiny,smollm2") -> None:
    """The flags every training bench takes (--models, --skip-trl, --repeat, --threads) and the hidden ones its
    worker processes are started with (--worker KIND and ``hidden``)."""
    parser.add_argument("--models", default=models, help="tiny, smollm2 (or a model name/path), comma-separated")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the arms this many rounds and keep each arm's fastest steady step")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: torch's default); 1 avoids OpenMP stalls on a busy machine")
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    for flag in hidden:
        parser.add_argument(flag, help=argparse.SUPPRESS)


def report(result: dict, started: float) -> None:
    """A worker's last act: its ``RESULT {json}`` line with end to end (since ``started``, imports included), peak
    RSS and CPU seconds (steadier than wall time on a shared machine) added."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(total_s=time.perf_counter() - started, peak_rss_mb=usage.ru_maxrss / 1024,
                  cpu_s=usage.ru_utime + usage.ru_stime)
    print("RESULT " + json.dumps(result), flush=True)


def launch_arm(script: str, kind: str, label: str, threads: int = 0, **flags) -> dict:
    """Run ``script --worker kind --FLAG value ...`` as its own process (``run_worker``), add start-up = end to end −
    steps x steady step, and print the one-line progress note."""
    command = [sys.executable, script, "--worker", kind]
    for flag, value in flags.items():
        command += [f"--{flag}", str(value)]
    result = run_worker(command, threads)
    result["startup_s"] = result["total_s"] - result["steps"] * result["step_s"]
    print(f"[{label}] {kind} done: {result['total_s']:.1f} s (step {result['step_s']:.2f} s)", flush=True)
    return result


def print_rounds(results: dict[str, dict], repeat: int) -> None:
    """With ``--repeat`` > 1: every round's steady step per arm (``alternate`` kept the fastest)."""
    if repeat > 1:
        print(f"fastest of {repeat} alternating runs per arm; steps of every round: "
              + "; ".join(f"{k} " + " ".join(f"{s:.2f}" for s in r["step_s_all"]) for k, r in results.items()))


def run_arms(script: str, kinds: list[str], repeat: int, threads: int, work, label: str, **flags) -> dict[str, dict]:
    """Every arm of one (model, precision) cell: ``repeat`` rounds with the arms alternating (``alternate``), each a
    ``launch_arm`` of ``script`` with ``flags`` and its own output directory under ``work`` (``out`` in its result)."""

    def run(kind: str, round_: int) -> dict:
        out = work / f"{kind}-{label.replace(' ', '-')}-{round_}"
        return {**launch_arm(script, kind, label, threads, out=out, **flags), "out": out}

    return alternate(kinds, repeat, run)


def trl_step_clock() -> tuple[object, list[float]]:
    """A transformers ``TrainerCallback`` that appends ``time.perf_counter()`` at every optimizer step's end, and
    that list: a TRL worker's steady steps, timed as alignkit's are from its log."""
    from transformers import TrainerCallback

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    return StepEnds(), ends
