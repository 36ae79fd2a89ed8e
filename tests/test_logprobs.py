"""The fused LM-head log-prob function: values, entropies and gradients equal autograd's generic path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import alignkit.logprobs
from alignkit import packing
from alignkit.logprobs import HeadLogprobs, _generic_head_logprobs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_matches_autograd(bias, temperature, monkeypatch):
    monkeypatch.setattr(alignkit.logprobs, "CHUNK_TOKENS", 4)  # 3 chunks, the last one short
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    grad_out = torch.randn(10)

    want, want_entropy = _generic_head_logprobs(hidden, head, targets, temperature, True)
    (want * grad_out).sum().backward()
    want_grads = [hidden.grad.clone(), head.weight.grad.clone(), *([head.bias.grad.clone()] if bias else [])]
    hidden.grad = None
    head.zero_grad()

    got, got_entropy = HeadLogprobs.apply(hidden, head.weight, head.bias, targets, temperature, True, True)
    (got * grad_out).sum().backward()
    got_grads = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]

    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_entropy, want_entropy, atol=1e-5, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # by hand for one row: log p(y) = x_y/T − logsumexp(x/T)
    logits = (head(hidden[0]) / temperature).detach()
    assert float(got[0].detach()) == pytest.approx(float(logits[targets[0]] - torch.logsumexp(logits, 0)), abs=1e-5)


def test_fp32_head_on_cpu_multiplies_by_a_packed_weight_with_the_plain_result(monkeypatch):
    """On CPU the fp32 head packs its weight once per call (alignkit.packing) and gives, to rounding, the
    log-probs and gradients of the plain product; ALIGNKIT_PACKED_WEIGHTS=0 (packing.ENABLED) turns it off."""
    assert packing.packs(torch.float32, torch.device("cpu"))
    monkeypatch.setattr(alignkit.logprobs, "CHUNK_TOKENS", 4)
    torch.manual_seed(3)
    head = nn.Linear(16, 300, bias=False)
    targets, grad_out = torch.randint(0, 300, (10,)), torch.randn(10)
    packed_calls = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda w: packed_calls.append(w.shape) or real_pack(w))
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(packing, "ENABLED", enabled)
        hidden = torch.randn(10, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
        got, _ = HeadLogprobs.apply(hidden, head.weight, None, targets, 1.0, False, True)
        (got * grad_out).sum().backward()
        results[enabled] = (got.detach(), hidden.grad, head.weight.grad.clone())
        head.zero_grad()
    assert packed_calls == [torch.Size([300, 16])]  # one pack for the three chunks, none with packing off
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_grad_keeps_nothing_and_agrees():
    torch.manual_seed(1)
    head = nn.Linear(8, 50, bias=False)
    hidden, targets = torch.randn(6, 8), torch.randint(0, 50, (6,))
    with torch.no_grad():
        got, _ = HeadLogprobs.apply(hidden, head.weight, None, targets, 1.0, False, False)
        want, _ = _generic_head_logprobs(hidden, head, targets, 1.0, False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_extreme_logits_stay_finite():
    """A target 200 nats below the best token: log p is about −200, not −inf (the max is subtracted first)."""
    weight = torch.zeros(3, 1)
    weight[0, 0], weight[1, 0] = 200.0, 0.0
    hidden = torch.ones(1, 1, requires_grad=True)
    got, _ = HeadLogprobs.apply(hidden, weight, None, torch.tensor([1]), 1.0, False, True)
    assert float(got[0].detach()) == pytest.approx(-200.0, abs=1e-3)
    got.sum().backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_forward_equals_the_full_forward(lora):
    """Rows repeating a (left-padded) prompt run it once; log-probs and every gradient are unchanged. Groups of
    unequal size (3, 1, 2) and a padded response row included."""
    from alignkit.logprobs import token_logprobs
    from alignkit.models import LoraSettings, add_lora, tiny_causal_lm

    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    if lora:
        model = add_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    torch.manual_seed(0)
    prompt_len, response_len, sizes = 6, 5, torch.tensor([3, 1, 2])
    prompts = torch.randint(5, 1000, (3, prompt_len))
    prompt_mask = torch.ones(3, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_mask[2, :1] = 0
    rows = sum(sizes.tolist())
    input_ids = torch.cat([prompts.masked_fill(prompt_mask == 0, 2).repeat_interleave(sizes, 0),
                           torch.randint(5, 1000, (rows, response_len))], 1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(sizes, 0), torch.ones(rows, response_len, dtype=torch.long)], 1)
    attention_mask[1, -2:] = 0  # a shorter response, right-padded
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    target = torch.zeros_like(input_ids, dtype=torch.bool)
    target[:, prompt_len:] = attention_mask[:, prompt_len:].bool()
    weights = torch.randn(rows, prompt_len + response_len)

    def run(shared: int):
        model.zero_grad()
        out = token_logprobs(model, input_ids, target, attention_mask, position_ids, 0.9, shared_prefix=shared)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(0)
    shared, shared_grads = run(prompt_len)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    assert shared_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_head_under_bf16_autocast_runs_its_matmuls_in_bf16():
    """Under bf16 autocast (a native-bf16 CPU's default) forward and backward matmuls run in bf16, as autograd's
    linear does, with the softmax and its gradient in fp32: values and gradients equal the generic path under the
    same autocast to bf16 precision, and differ from the fp32 result by what bf16 rounding gives (not 0)."""
    torch.manual_seed(2)
    head = nn.Linear(64, 500, bias=False)
    hidden = torch.randn(12, 64, requires_grad=True)
    targets = torch.randint(0, 500, (12,))
    grad_out = torch.randn(12)

    def run(fn, autocast: bool):
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn()
        (out * grad_out).sum().backward()
        return out.detach(), hidden.grad.clone(), head.weight.grad.clone()

    def fused():
        return HeadLogprobs.apply(hidden, head.weight, None, targets, 1.0, False, True)[0]

    def generic():
        return _generic_head_logprobs(hidden, head, targets, 1.0, False)[0]

    got, want, exact = run(fused, True), run(generic, True), run(fused, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
    assert got[0].dtype == torch.float32 and got[1].dtype == hidden.dtype and got[2].dtype == head.weight.dtype
    assert not torch.equal(got[1], exact[1])  # the backward really ran in bf16
    torch.testing.assert_close(got[1], exact[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("lora", [False, True])
def test_packed_linears_give_the_plain_logprobs_and_restore_the_layers(lora):
    """DPO's and KTO's reference precompute multiply by weights packed once (``packing.packed_linears``): the same log-probs
    as the plain layers (fp32 rounding), every projection of the backbone swapped inside the block (a LoRA model's
    base layers too) but not the LM head, the layers' own forward back afterwards, and autograd untouched outside."""
    from alignkit.logprobs import token_logprobs
    from alignkit.models import LoraSettings, add_lora, tiny_causal_lm

    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    if lora:
        model = add_lora(model, LoraSettings(r=4, alpha=8))
    ids = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    target = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        plain = token_logprobs(model, ids, target)
        with packing.packed_linears(model):
            swapped = [m for m in model.modules() if "forward" in vars(m)]
            packed = token_logprobs(model, ids, target)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
    if packing.packs(torch.float32, torch.device("cpu")):
        assert len(swapped) >= 2 * 7  # q, k, v, o, gate, up, down in each block
        # the output layer is not: the log-probs pack its weight themselves (a copy would only take memory)
        assert all(m is not model.get_output_embeddings() for m in swapped)
    assert not any("forward" in vars(m) for m in model.modules())
    token_logprobs(model, ids, target).sum().backward()  # the plain layers again
    with packing.packed_linears(model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):  # a mixed-precision pass
        assert not any("forward" in vars(m) for m in model.modules())  # keeps autocast's own products
