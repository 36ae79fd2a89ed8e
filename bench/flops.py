"""FLOP bounds for the benchmarks: the matmul work a step cannot avoid, and this machine's measured matmul rate.

A decoder token costs 2·N_body multiply-adds forward (N_body = the weights of the linear layers of the blocks),
plus 2·N_head at positions where the LM head is needed; backward costs twice the forward. Attention scores and
element-wise work are left out (small at these lengths), so the bound is optimistic: nothing can beat it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

import torch


def linear_params(model) -> tuple[int, int]:
    """(body, head) weight counts: 2-D weights of the blocks, and the LM head (vocab x hidden)."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    return body, head


def train_flops(body: int, head: int, tokens: int, head_tokens: int, frozen_tokens: int = 0,
                frozen_head_tokens: int = 0) -> float:
    """Forward + backward over ``tokens`` (head at ``head_tokens``), plus forward-only passes (reference)."""
    return 6.0 * (body * tokens + head * head_tokens) + 2.0 * (body * frozen_tokens + head * frozen_head_tokens)


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


def run_worker(command: list[str], threads: int = 0) -> dict:
    """Run one bench arm in its own process (so its peak RSS is its own) and read its ``RESULT {json}`` line; adds
    the median steady step ``step_s`` (from the worker's ``step_ends``), ``steps`` and the mean load average."""
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
    return result
