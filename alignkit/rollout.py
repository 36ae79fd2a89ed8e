"""Fast batched sampling with per-token log-probs, the rollout step of online RL (PPO, GRPO, RLOO, RAFT, BoN).

`sample(model, prompts, config)` returns a `Rollout`: left-padded prompts, right-padded responses, and the
log-prob of every sampled token under the distribution it was drawn from.

Two decoders share one sampling rule (`next_token`):

* a plain-torch decoder for llama-style models (Llama, Mistral, Qwen2: RMSNorm, rotary, GQA, SwiGLU), also
  under peft (LoRA deltas are merged into a temporary copy of the weights). It preallocates the KV cache
  and the attention mask, precomputes the rotary tables, and saves prefill work three ways: the prefix all
  prompts share (a chat template's system turn) runs once, a prompt repeated in the batch (a GRPO group)
  runs once, and the rest runs in length-sorted row chunks with little padding; the LM head sees only the
  last position. On CPU the weights are packed into oneDNN's blocked layout, which multiplies the few rows of
  a decode step 1.3-1.8x faster than torch's default GEMM; Q/K/V and gate/up projections are fused into one
  matmul each whenever the weights are copied anyway (packed or converted to bf16). A frozen model keeps its
  packed weights between calls. Finished rows leave the batch once half of them have ended.
* a generic loop over any Hugging Face causal LM with its own KV cache, for everything else.

Decoding is exact: in fp32 the plain-torch decoder gives the same greedy tokens as `model.generate` and the
same log-probs as a full forward pass (tests/test_rollout.py). bf16 is only worth it on CPUs with native bf16
matmuls (AVX512-BF16/AMX; oneDNN reports it); elsewhere it is several times slower than fp32, so the default
`dtype="auto"` picks bf16 only where it is fast.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit import packing

# Rows of the prefill are processed in chunks of about this many tokens: big enough for efficient matmuls,
# small enough to keep the (rows, length, intermediate) MLP activations in cache-friendly sizes.
PREFILL_CHUNK_TOKENS = 2048
PREFILL_CHUNK_COST = 32  # what one more prefill chunk costs, in token positions (see _prefill_chunks)
LM_HEAD_SLICE = 2048  # vocabulary rows per LM-head matmul (see _LlamaDecoder._logits)
_FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# on_step(t, rows, tokens, logits or None) -> stop?; see `sample`
StepHook = Callable[[int, Tensor, Tensor, "Tensor | None"], "bool | None"]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32  # length cap of a response, EOS included
    min_new_tokens: int = 0  # EOS is banned before this many tokens (HF's min_new_tokens)
    temperature: float = 1.0  # logits are divided by it before softmax (the argmax of greedy ignores it)
    top_p: float = 1.0  # nucleus: smallest set of most likely tokens with mass >= top_p; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    greedy: bool = False  # argmax instead of sampling
    dtype: str = "auto"  # "auto" = bf16 where the CPU/GPU has fast bf16, else fp32; "bf16"; "fp32"; "model"
    fast: bool = True  # use the plain-torch decoder when the architecture allows it

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1, top_k >= 0: {self}")


@dataclass
class Rollout:
    """A batch of sampled responses. B sequences, P prompt columns, T = longest response.

    `logprobs[b, t]` is log π'(y_t | x, y_<t) where π' is the distribution the token was drawn from:
    softmax(logits / temperature), restricted to the top-k / top-p set and renormalised, with EOS removed
    before `min_new_tokens`. With temperature 1 and no filtering it is the model's own log-prob. Greedy
    reports the same quantity for the argmax token. PPO/GRPO should still recompute the "old" log-probs
    with their training forward when precision or kernels differ: a bf16 matmul followed by an fp32
    logsumexp differs from full fp32 by up to ~5e-3 nats per token (~0.5 nats over 100 tokens), enough
    to move a probability ratio that must start at exactly 1.
    """

    prompt_ids: Tensor  # (B, P) left-padded with pad_token_id
    prompt_mask: Tensor  # (B, P) 1 on prompt tokens
    response_ids: Tensor  # (B, T) right-padded with pad_token_id
    response_mask: Tensor  # (B, T) 1 on generated tokens, including the EOS that ended the response
    logprobs: Tensor  # (B, T) fp32, 0 on padding
    ended_with_eos: Tensor  # (B,) bool; False means truncated at max_new_tokens

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Rollout:
        """The same rollout on ``device`` (accelerate's send_to_device calls this)."""
        return Rollout(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    @property
    def input_ids(self) -> Tensor:
        """(B, P + T) prompt and response, the input of a training forward."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, P + T) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


# ----------------------------------------------------------------------------------------------------------
# The sampling rule, shared by both decoders


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Return logits / temperature with -inf outside the top-k and the top-p nucleus (in place, fp32).

    Nucleus (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751, eq. 2-3): with p sorted in decreasing
    order, keep token i iff the mass strictly before it, sum_{j<i} p_j, is below top_p, so the most likely
    token is always kept and the kept set is the smallest one with mass >= top_p.
    """
    if temperature != 1.0:
        logits.div_(temperature)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        logits.masked_fill_(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
    return logits


def next_token(
    logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick one token per row from (B, V) fp32 logits (changed in place). Returns tokens, log-probs: (B,)."""
    logits = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    # log Z = m + log Σ exp(x − m), m the row max, with the exponentials kept for the CDF below: one pass over
    # the logits fewer than torch.logsumexp and a separate exp (64 x 49k on 2 AVX2 cores: 4.5 ms for logsumexp
    # alone, whose internal subtraction is slow, against 0.2 ms for the max)
    top = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    exp = logits.sub(top).exp_()  # (B, V) unnormalised probabilities
    logz = (top + exp.sum(dim=-1, keepdim=True).log_()).squeeze(1)  # (B,)
    if config.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        # Inverse-CDF sampling: one uniform per row, scaled by the row's total. torch.multinomial draws an
        # exponential per vocabulary entry, ~30x slower here at 64 x 49k. Zero-probability tokens own empty
        # intervals of the CDF, and u in (0, 1] keeps the draw off the empty interval at 0.
        cdf = exp.cumsum_(dim=-1)  # (B, V)
        u = 1.0 - torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - logz


# ----------------------------------------------------------------------------------------------------------
# Entry point


def sample(
    model: torch.nn.Module,
    prompts: list[list[int]] | Tensor,
    config: SamplingConfig = SamplingConfig(),
    *,
    tokenizer=None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    prompt_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
    step_logits: bool = False,
) -> Rollout:
    """Sample one response per prompt; stops a row at its first EOS and the batch once all rows ended.

    prompts: token-id lists, or a (B, P) tensor with an optional `prompt_mask` (any padding side).
    EOS ids come from `eos_token_id`, else the tokenizer, else the model's generation config (one id or a
    list); the pad id from `pad_token_id`, else the tokenizer, else the first EOS id.

    `on_step(t, rows, tokens, logits)` is called after every decode step t, as soon as the tokens exist (what
    `alignkit serve` streams): `rows` (n,) are the batch rows still decoding (finished rows leave the batch),
    `tokens` (n,) what each drew (pad for a row that already ended), `logits` (n, V) fp32 the model's own
    next-token logits before temperature and filtering when `step_logits`, else None. A true return value
    stops the whole batch after this step (e.g. every row has hit a stop string). The tensors are only valid
    during the call. Without a hook the loop is unchanged.
    """
    inner = _unwrap(model)
    device = next(inner.parameters()).device
    eos_ids = _eos_ids(inner, tokenizer, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    rows = _as_lists(prompts, prompt_mask)
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    ids, mask = _left_pad(rows, pad_token_id, device)
    dtype = _resolve_dtype(config.dtype, inner, device)
    reason = _fast_path_unsupported(inner, ids.shape[1] + config.max_new_tokens) if config.fast else "off"
    # the sampler's precision is config.dtype, never an enclosing autocast's (packed weights take no autocast)
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        if reason is None:
            decoder = _decoder(inner, dtype)
            out = decoder.generate(rows, ids.shape[1], config, eos_ids, pad_token_id, generator, on_step, step_logits)
        else:
            out = _generic_generate(inner, ids, mask, config, eos_ids, pad_token_id, dtype, generator, on_step,
                                    step_logits)
    response_ids, response_mask, logprobs, ended = out
    return Rollout(ids, mask, response_ids, response_mask, logprobs, ended)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/accelerate wrappers and peft's PeftModel; LoRA layers stay (they are merged later)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _eos_ids(model: torch.nn.Module, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        gen_config = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_config, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _as_lists(prompts: list[list[int]] | Tensor, prompt_mask: Tensor | None) -> list[list[int]]:
    if not isinstance(prompts, Tensor):
        return [list(map(int, p)) for p in prompts]
    if prompt_mask is None:
        return prompts.tolist()
    return [row[m.bool()].tolist() for row, m in zip(prompts, prompt_mask, strict=True)]


def _left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _resolve_dtype(name: str, model: torch.nn.Module, device: torch.device) -> torch.dtype:
    if name == "model":
        return next(model.parameters()).dtype
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        # Without native bf16 (AVX512-BF16/AMX) CPU bf16 matmuls take a slow reference path. The same test as
        # the trainers' --mixed-precision auto (and its ALIGNKIT_BF16 override).
        from alignkit.models import bf16_is_fast

        return torch.bfloat16 if bf16_is_fast() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, model, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def _start_state(
    batch: int, config: SamplingConfig, pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs kept time-major, (T, B): a step writes one contiguous row."""
    tokens = torch.full((config.max_new_tokens, batch), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((config.max_new_tokens, batch), dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    return tokens, logprobs, done


def _finish(tokens: Tensor, logprobs: Tensor, steps: int, eos: Tensor, pad_token_id: int):
    """Time-major buffers -> (response_ids, response_mask, logprobs, ended_with_eos), batch-major."""
    tokens, logprobs = tokens[:steps].T.contiguous(), logprobs[:steps].T.contiguous()
    is_eos = torch.isin(tokens, eos)
    # A token is real up to and including the first EOS; everything after it is padding.
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = (~eos_before).long()
    tokens = tokens.masked_fill(eos_before, pad_token_id)
    logprobs = logprobs.masked_fill(eos_before, 0.0)
    return tokens, mask, logprobs, is_eos.any(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Generic decoder: any HF causal LM, its own forward and KV cache


def _generic_generate(model, ids, mask, config, eos_ids, pad_token_id, dtype, generator, on_step=None,
                      step_logits=False):
    device = ids.device
    batch = ids.shape[0]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    tokens, logprobs, done = _start_state(batch, config, pad_token_id, device)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    position = (mask.cumsum(dim=1) - 1).clamp_(min=0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != next(model.parameters()).dtype)
    was_training = model.training
    model.eval()  # dropout off while sampling
    try:
        step_ids, step_pos, steps = ids, position, 0
        for t in range(config.max_new_tokens):
            with autocast:
                out = model(
                    input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                    **{cache_kw: cache}, **extra,
                )
            logits = out.logits[:, -1].float()
            raw = logits.clone() if step_logits else None  # _pick filters the logits in place
            tok, lp = _pick(logits, t, config, eos, generator)
            tokens[t] = tok.masked_fill_(done, pad_token_id)
            logprobs[t] = lp.masked_fill_(done, 0.0)
            done |= torch.isin(tok, eos)
            steps = t + 1
            if on_step is not None and on_step(t, torch.arange(batch, device=device), tok, raw):
                break
            if bool(done.all()):
                break
            step_ids, step_pos = tok[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        model.train(was_training)
    return _finish(tokens, logprobs, steps, eos, pad_token_id)


def _pick(logits: Tensor, t: int, config: SamplingConfig, eos: Tensor, generator) -> tuple[Tensor, Tensor]:
    if t < config.min_new_tokens and eos.numel():
        logits[:, eos] = float("-inf")
    return next_token(logits, config, generator)


# ----------------------------------------------------------------------------------------------------------
# Plain-torch decoder for llama-style models


def _fast_path_unsupported(model: torch.nn.Module, total_len: int) -> str | None:
    """None if `_LlamaDecoder` computes exactly what `model` computes, else the reason it would not."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _FAST_MODEL_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(model, "lm_head") or not hasattr(inner, "layers"):
        return "not a *ForCausalLM layout"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        return "length-dependent rope"  # cos/sin would change with the sequence length
    window = getattr(config, "sliding_window", None)
    if window is not None and total_len > window:
        return "sliding window shorter than the sequence"
    layer = inner.layers[0]
    if hasattr(layer.self_attn, "q_norm") or getattr(layer.self_attn, "is_causal", True) is not True:
        return "attention variant"
    for module in model.modules():
        # peft's modules_to_save / trainable-token wrappers keep an `original_module`
        if hasattr(module, "original_module") or (hasattr(module, "base_layer") and not _plain_lora(module)):
            return f"adapter {type(module).__name__}"
    return None


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frozen model -> (weights' key, decoder)


def _decoder(model: torch.nn.Module, dtype: torch.dtype) -> _LlamaDecoder:
    """`model`'s decoder. A frozen model (no weight requires grad: serving, judging, critiquing, best-of-N) keeps
    it, packed weights included, from call to call until a weight changes (an in-place write bumps its version);
    a model being trained gets a fresh one per call, so no stale copy of its weights outlives the call."""
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        _DECODERS.pop(model, None)
        return _LlamaDecoder(model, dtype)
    key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
    cached = _DECODERS.get(model)
    if cached is None or cached[0] != key:
        _DECODERS.pop(model, None)  # the old copy goes before the new one is made
        cached = _DECODERS[model] = (key, _LlamaDecoder(model, dtype))
    return cached[1]


def _plain_lora(module: torch.nn.Module) -> bool:
    """A peft LoRA layer whose effect is exactly W + ΔW (no DoRA or other variant, no LoRA bias)."""
    if not hasattr(module, "get_delta_weight"):
        return False
    if not (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A")):
        return False
    variants, biases = getattr(module, "lora_variant", {}), getattr(module, "lora_bias", {})
    return not any(a in variants or biases.get(a) for a in getattr(module, "active_adapters", []))


def _weight(module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """Effective (weight, bias) of a Linear/Embedding, LoRA deltas of the active adapters added."""
    base = getattr(module, "base_layer", module)
    weight = base.weight
    if base is not module and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}) or name in getattr(module, "lora_embedding_A", {}):
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, getattr(base, "bias", None)


def _projections(modules: list[torch.nn.Module], dtype: torch.dtype) -> list[tuple[Tensor, Tensor | None]]:
    """(weight, bias) pairs of projections that read the same input, in `dtype`.

    When the weights must be copied anyway (converted to `dtype`, or packed, below) they are also concatenated,
    so one matmul replaces several. Otherwise they are used in place: on a 2-core Zen 3 in fp32, separate
    matmuls were ~10% faster than the fused one, and fusing would copy ~280 MB of SmolLM2 weights on every call.
    """
    pairs = [_weight(m) for m in modules]
    pack = packing.packs(dtype, pairs[0][0].device)
    if all(w.dtype == dtype for w, _ in pairs) and not pack:
        return pairs
    weight = pairs[0][0].to(dtype) if len(pairs) == 1 else torch.cat([w.to(dtype) for w, _ in pairs], dim=0)
    bias = None
    if any(b is not None for _, b in pairs):
        bias = torch.cat([(b if b is not None else w.new_zeros(w.shape[0])).to(dtype) for w, b in pairs])
    return [(packing.pack(weight) if pack else weight, bias)]


def _linears(x: Tensor, projections: list[tuple[Tensor, Tensor | None]], sizes: list[int]) -> list[Tensor]:
    """Outputs of the projections: one matmul split when fused, else one matmul each."""
    if len(projections) == 1 and len(sizes) > 1:
        return list(packing.linear(x, *projections[0]).split(sizes, dim=-1))
    return [packing.linear(x, w, b) for w, b in projections]


def _prefill_chunks(lengths: list[int]) -> list[list[int]]:
    """Prompts (by their lengths) grouped into row chunks for the prefill, each sorted by length, so a chunk's
    last prompt is its longest and the others are padded to it.

    The chunks split the length-sorted prompts at the cuts that minimise the positions computed, padding
    included, plus PREFILL_CHUNK_COST per chunk (its per-layer calls, and the smaller matmuls of a short chunk),
    with at most PREFILL_CHUNK_TOKENS positions in a chunk of several rows (dynamic programming over the
    cuts). Chat prompts after their shared system turn spread widely (10-84 tokens on bench_rollout's 64
    prompts): one chunk up to the token cap padded them to 2,632 positions for 1,534 tokens; these cuts to
    1,678 in 6 chunks.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cost = [0.0] + [float("inf")] * len(order)  # cost[j]: the best split of the first j prompts
    start = [0] * (len(order) + 1)  # where the last chunk of that split starts
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j - 1, -1, -1):  # the last chunk is order[i:j]
            rows = j - i
            if rows > 1 and rows * longest > PREFILL_CHUNK_TOKENS:
                break
            if cost[i] + rows * longest + PREFILL_CHUNK_COST < cost[j]:
                cost[j], start[j] = cost[i] + rows * longest + PREFILL_CHUNK_COST, i
    chunks, j = [], len(order)
    while j > 0:
        chunks.append(order[start[j] : j])
        j = start[j]
    return chunks[::-1]


class _LlamaDecoder:
    """Weights of a llama-style model laid out for decoding, plus the decode loop.

    Shapes: B rows, S new positions, H query heads, KV key-value heads (GQA: H / KV queries share one),
    D head dim, C hidden size, I intermediate size, L cache length, V vocabulary.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        config, inner = model.config, model.model
        self.dtype = dtype
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.eps = config.rms_norm_eps
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        self.qkv_sizes = [H * D, KV * D, KV * D]
        self.mlp_sizes = [config.intermediate_size] * 2
        self.embed = _weight(inner.embed_tokens)[0].to(dtype)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.to(dtype),
                _projections([a.q_proj, a.k_proj, a.v_proj], dtype),
                _projections([a.o_proj], dtype)[0],
                layer.post_attention_layernorm.weight.to(dtype),
                _projections([m.gate_proj, m.up_proj], dtype),
                _projections([m.down_proj], dtype)[0],
            ))
        self.norm = inner.norm.weight.to(dtype)
        self.lm_head = _projections([model.lm_head], dtype)[0]
        self.rotary = inner.rotary_emb

    # -- pieces of the forward ------------------------------------------------------------------------------

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        # One fused op; in fp32 bit-identical to HF's LlamaRMSNorm, which takes seven.
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x·cos + rotate_half(x)·sin, rotate_half(x) = (-x2, x1), without building rotate_half(x).

        x (B, S, heads, D); cos, sin (B, S, 1, D).
        """
        half = self.head_dim // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    def _layer_forward(self, x, layer, cos, sin, k_cache, v_cache, col0, col1, attn_mask):
        """x (B, S, C) fills cache columns [col0, col1) and attends to columns [0, col1) under attn_mask."""
        ln1, qkv, o_proj, ln2, gate_up, down = layer
        B, S, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        q, k, v = _linears(self._norm(x, ln1), qkv, self.qkv_sizes)
        q = self._rope(q.view(B, S, H, D), cos, sin).transpose(1, 2)  # (B, H, S, D)
        k_cache[:, :, col0:col1] = self._rope(k.view(B, S, KV, D), cos, sin).transpose(1, 2)
        v_cache[:, :, col0:col1] = v.view(B, S, KV, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k_cache[:, :, :col1], v_cache[:, :, :col1], attn_mask=attn_mask, enable_gqa=True
        )
        x = x + packing.linear(o.transpose(1, 2).reshape(B, S, H * D), *o_proj)
        gate, up = _linears(self._norm(x, ln2), gate_up, self.mlp_sizes)
        return x + packing.linear(F.silu(gate) * up, *down)

    def _logits(self, x: Tensor) -> Tensor:
        """(B, C) last hidden states -> (B, V) fp32 logits.

        A packed head (`alignkit.packing`) is one product. Unpacked, the head runs in vocabulary slices whose
        output stays in cache, as W_slice · hᵀ (vocabulary-major): at decode batch sizes that orientation of the
        GEMM was 1.4x faster here than h · W_sliceᵀ (batch 8: 20.6 -> 14.9 ms, batch 64: 54.7 -> 37.3 ms for
        SmolLM2's 49k x 576 head).
        """
        h = self._norm(x, self.norm)
        weight, bias = self.lm_head
        if weight.is_mkldnn:
            return packing.linear(h, weight, bias).float()
        logits = torch.empty(weight.shape[0], x.shape[0], dtype=torch.float32, device=x.device)  # (V, B)
        for i in range(0, weight.shape[0], LM_HEAD_SLICE):
            j = i + LM_HEAD_SLICE
            logits[i:j] = torch.mm(weight[i:j], h.t()) if bias is None else torch.addmm(bias[i:j, None], weight[i:j], h.t())
        return logits.t().contiguous()

    def _rope_tables(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin for positions 0..length-1, computed by the model's own rotary module (any rope scaling)."""
        pos = torch.arange(length, device=device)[None]
        cos, sin = self.rotary(self.embed[:1, None].float(), pos)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)  # (length, D)

    # -- the decode loop ------------------------------------------------------------------------------------

    def _prefill(self, rows, width, kv, cos_tab, sin_tab) -> tuple[Tensor, Tensor]:
        """Run the prompts into cache columns [0, width); return their last-token logits (B, V) and the
        (B, width) mask of the columns that hold prompt tokens.

        Work saved against one padded batch: the prefix that all prompts share (a chat template's system
        turn) is run once into columns [0, n0); the rest of each unique prompt (a GRPO group repeats one
        prompt) is run once, in row chunks of similar lengths padded only to the chunk's longest
        (`_prefill_chunks`), and right-aligned to column `width`. Cache columns need not be contiguous in
        position: rotary encodes positions into the keys, and the mask hides the gap between prefix and suffix.
        """
        device = cos_tab.device
        first_row: dict[tuple[int, ...], int] = {}
        owner = [first_row.setdefault(tuple(r), len(first_row)) for r in rows]  # batch row -> unique prompt
        uniq = list(first_row)
        # Shared prefix, kept short of the shortest prompt: every row needs one token of its own for logits.
        n0 = min(len(u) for u in uniq) - 1
        for i in range(n0):
            if any(u[i] != uniq[0][i] for u in uniq):
                n0 = i
                break
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
        prefix = []  # per layer: keys, values (1, KV, n0, D)
        if n0 > 0:
            x = F.embedding(torch.tensor([uniq[0][:n0]], device=device), self.embed)
            cos, sin = cos_tab[None, :n0, None], sin_tab[None, :n0, None]  # (1, n0, 1, D)
            for layer, kv_layer in zip(self.layers, kv, strict=True):
                k = torch.empty(1, self.n_kv, n0, self.head_dim, dtype=self.dtype, device=device)
                v = torch.empty_like(k)
                x = self._layer_forward(x, layer, cos, sin, k, v, 0, n0, causal[None, None, :n0, :n0])
                kv_layer[:, :, :, :n0] = torch.stack([k, v])  # broadcast over the batch
                prefix.append((k, v))

        chunks = _prefill_chunks([len(u) - n0 for u in uniq])
        last_hidden = torch.empty(len(uniq), self.embed.shape[1], dtype=self.dtype, device=device)
        for chunk in chunks:
            n, length = len(chunk), len(uniq[chunk[-1]]) - n0  # suffix columns of this chunk
            ids = torch.zeros((n, length), dtype=torch.long)
            valid = torch.zeros((n, length), dtype=torch.bool)
            for i, u in enumerate(chunk):
                ids[i, length - len(uniq[u]) + n0 :] = torch.tensor(uniq[u][n0:])
                valid[i, length - len(uniq[u]) + n0 :] = True
            ids, valid = ids.to(device), valid.to(device)
            position = n0 + (valid.long().cumsum(dim=1) - 1).clamp_(min=0)
            cos, sin = cos_tab[position][:, :, None], sin_tab[position][:, :, None]  # (n, S, 1, D)
            # Queries see the whole prefix, then causal over their own valid suffix tokens. A padding query
            # also sees itself: a row with no visible key would give NaN.
            own = causal[:length, :length] & valid[:, None, :]
            own |= torch.eye(length, dtype=torch.bool, device=device)
            mask = torch.cat([own.new_ones(n, length, n0), own], dim=2)[:, None]  # (n, 1, S, n0 + S)
            # the batch rows holding a prompt of this chunk, and the chunk row that feeds each
            slot = {u: i for i, u in enumerate(chunk)}
            dest = [r for r, u in enumerate(owner) if u in slot]
            src = torch.tensor([slot[owner[r]] for r in dest], device=device)
            dest = torch.tensor(dest, device=device)
            x = F.embedding(ids, self.embed)
            for i, (layer, kv_layer) in enumerate(zip(self.layers, kv, strict=True)):
                k = torch.empty(n, self.n_kv, n0 + length, self.head_dim, dtype=self.dtype, device=device)
                v = torch.empty_like(k)
                if n0 > 0:
                    k[:, :, :n0], v[:, :, :n0] = prefix[i]
                x = self._layer_forward(x, layer, cos, sin, k, v, n0, n0 + length, mask)
                kv_layer[0, :, :, width - length : width].index_copy_(0, dest, k[src, :, n0:])
                kv_layer[1, :, :, width - length : width].index_copy_(0, dest, v[src, :, n0:])
            last_hidden[torch.tensor(chunk, device=device)] = x[:, -1]

        lengths = torch.tensor([len(r) for r in rows], device=device)
        cols = torch.arange(width, device=device)
        filled = (cols < n0) | (cols >= width - (lengths - n0)[:, None])  # (B, width)
        return self._logits(last_hidden[torch.tensor(owner, device=device)]), filled

    def generate(self, rows, width, config: SamplingConfig, eos_ids, pad_token_id, generator, on_step=None,
                 step_logits=False):
        device = self.embed.device
        batch, steps_max = len(rows), config.max_new_tokens
        length = width + steps_max
        KV, D = self.n_kv, self.head_dim
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        cos_tab, sin_tab = self._rope_tables(length, device)
        # One allocation for all layers: (layers, 2, B, KV, L, D). Prompt columns are zeroed because padding
        # leaves some unwritten, and masked-out garbage could still be NaN (0 * NaN = NaN in attention).
        kv = torch.empty(len(self.layers), 2, batch, KV, length, D, dtype=self.dtype, device=device)
        kv[..., :width, :].zero_()
        logits, filled = self._prefill(rows, width, kv, cos_tab, sin_tab)
        # Additive attention mask over cache columns, (B, 1, 1, L): 0 on prompt and generated tokens.
        bias = torch.zeros(batch, 1, 1, length, dtype=self.dtype, device=device)
        bias[:, 0, 0, :width].masked_fill_(~filled, float("-inf"))
        lengths = torch.tensor([len(r) for r in rows], device=device)
        tokens, logprobs, done = _start_state(batch, config, pad_token_id, device)
        alive = torch.arange(batch, device=device)  # batch row of each decoding row
        steps = 0
        for t in range(steps_max):
            raw = logits.clone() if step_logits else None  # _pick filters the logits in place
            tok, lp = _pick(logits, t, config, eos, generator)
            tok.masked_fill_(done, pad_token_id)
            tokens[t].index_copy_(0, alive, tok)
            logprobs[t].index_copy_(0, alive, lp.masked_fill_(done, 0.0))
            done |= torch.isin(tok, eos)
            steps = t + 1
            if on_step is not None and on_step(t, alive, tok, raw):
                break
            n_alive = int((~done).sum())
            if n_alive == 0 or t == steps_max - 1:
                break
            if n_alive <= done.numel() // 2:
                # Half the rows have finished: stop paying for them (costs one copy of the cache).
                keep = (~done).nonzero().squeeze(1)
                kv, bias, lengths, alive = kv[:, :, keep], bias[keep], lengths[keep], alive[keep]
                tok, done = tok[keep], done[keep]
            col = width + t
            pos = lengths + t
            cos, sin = cos_tab[pos][:, None, None], sin_tab[pos][:, None, None]  # (B, 1, 1, D)
            x = F.embedding(tok[:, None], self.embed)  # (B, 1, C)
            attn_mask = bias[..., : col + 1]
            for layer, c in zip(self.layers, kv, strict=True):
                x = self._layer_forward(x, layer, cos, sin, c[0], c[1], col, col + 1, attn_mask)
            logits = self._logits(x[:, 0])
        return _finish(tokens, logprobs, steps, eos, pad_token_id)
