"""Weights packed into oneDNN's blocked layout, for products that read a weight many times per copy.

torch's default CPU GEMM (MKL) reads a weight in its plain row-major layout on every call; oneDNN can reorder
it once into the blocked layout its kernels stream, after which a product with it is plain ``linear``. Two
users: the sampler's decoder (``alignkit.rollout``), which multiplies a few rows by every weight at each
decode step, and the LM head of the training log-probs (``alignkit.logprobs.HeadLogprobs``), a
(tokens x 576) · (576 x 49,152) product for SmolLM2 whose wide output MKL handles worst. Measured on a 2-core
AVX2 EPYC, fp32: SmolLM2's 576 -> 1536 projection at 8 rows 1.4-1.8x faster packed; the head at 995-1,024
rows 73-126 GFLOP/s plain (by operand order and row count) against 149-151 packed, where a 1,024 square matmul
runs at 122-132 either way. Packing the head costs ~25 ms (one read and one write of its 113 MB).

A third: ``packed_linears``, around no-grad passes over weights that stay fixed for the whole pass (DPO's and KTO's
reference precompute; both sides of an evaluation's KL, ``online.with_policy_logprobs``), packs every linear layer
once; SmolLM2's backbone forward over 12 x 256 tokens took 5.6-5.7 s instead of 6.3-6.7 s (1.12-1.19x, three
interleaved rounds; packing all its layers 0.19 s). Not the training-time reference of PPO/GRPO: its log-probs are
set against the training forward's, on plain weights, and must equal them exactly while the policy is unchanged.

``ALIGNKIT_PACKED_WEIGHTS=0`` turns packing off everywhere (plain weights, torch's GEMM).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

ENABLED = os.environ.get("ALIGNKIT_PACKED_WEIGHTS", "1") != "0"
# The row count oneDNN is told to pack for. 64-row products ran within 3% of their best with any hint from 8 to
# 2,048, 8-row ones with any from 64 up (12% slower with 8); a 1,024-row head product ran at 150 GFLOP/s with 64
# but 80 with a hint of 1,024.
PACK_ROWS = 64
_PACKABLE: dict[torch.dtype, bool] = {}


def packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of ``dtype`` on ``device`` are packed: a CPU tensor, packing on, and oneDNN's packed linear
    available for this dtype on this CPU (bf16 wants AVX512-BW or AVX-NE-CONVERT); the first use of each dtype
    checks by packing a small matrix."""
    if device.type != "cpu" or not ENABLED or not torch.backends.mkldnn.is_available():
        return False
    if dtype not in _PACKABLE:
        try:
            out = linear(torch.ones(2, 8, dtype=dtype), pack(torch.ones(8, 8, dtype=dtype)), None)
            _PACKABLE[dtype] = bool((out == 8).all())
        except (RuntimeError, AttributeError):
            _PACKABLE[dtype] = False
    return _PACKABLE[dtype]


def pack(weight: Tensor) -> Tensor:
    """A (out, in) weight as an opaque oneDNN tensor for ``linear`` (a copy; the weight itself is untouched)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b, for a plain or a packed weight. No autograd through a packed weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


@contextmanager
def packed_linears(module: nn.Module, autocast=nullcontext):
    """Within the block every plain ``nn.Linear`` of ``module`` with an fp32 CPU weight multiplies by a packed copy
    of it, made on entry (no autograd: for no-grad passes whose weights do not change inside the block). Nothing is
    packed when the pass runs under ``autocast()`` on the CPU (a packed product takes no autocast: the pass keeps
    its mixed precision). Sharded (DTensor) weights and other dtypes keep their own forward. A causal LM's output
    layer is left alone: the log-probs read its weight directly and pack it themselves (``logprobs.HeadLogprobs``),
    so a packed copy of it (113 MB for SmolLM2) would only take memory."""
    with autocast():
        mixed = torch.is_autocast_enabled("cpu")
    swapped = []
    if not mixed and packs(torch.float32, torch.device("cpu")):
        heads = _output_layers(module)
        for layer in module.modules():
            weight = getattr(layer, "weight", None)
            if type(layer) is nn.Linear and id(layer) not in heads and weight.device.type == "cpu" \
                    and weight.dtype == torch.float32 and not isinstance(weight, DTensor):
                layer.forward = partial(linear, weight=pack(weight), bias=layer.bias)  # shadows the class's forward
                swapped.append(layer)
    try:
        yield
    finally:
        for layer in swapped:
            del layer.forward


def _output_layers(module: nn.Module) -> set[int]:
    """ids of the output layers (``get_output_embeddings``) of the models inside ``module``."""
    found = set()
    for m in module.modules():
        if callable(getattr(type(m), "get_output_embeddings", None)):
            try:
                head = m.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                continue
            if head is not None:
                found.add(id(head))
    return found
