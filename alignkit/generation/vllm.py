"""``--generator vllm``: a vLLM engine colocated in the trainer's process, fed the policy's current weights.

The engine is built once from the policy's *config and tokenizer only* (``load_format="dummy"``: random
weights, nothing written twice to disk), then every call first pushes the policy's weights as they are now
(LoRA deltas merged, W + ΔW, the model itself untouched) through the model's own ``load_weights`` (the path
TRL's colocate mode and OpenRLHF take; here through vLLM's in-place ``reload_weights``, which also redoes the
CPU backend's repacking of the weights for its kernels), and drops the prefix cache (its KV blocks belong to the old weights).
So the first rollout already comes from the policy, a resumed checkpoint reaches the engine, and an online
trainer needs no extra call after its updates.

Rollouts come back as token ids in alignkit's ``Rollout`` shape (left-padded prompts, right-padded responses,
EOS included in the mask, ``ended_with_eos``). The trainers recompute every log-prob they use (old policy,
reference) with their own training forward, as with the builtin sampler, so their math is unchanged; the
``Rollout.logprobs`` vLLM returns are those of the distribution it sampled from (its ``processed_logprobs``:
after temperature and top-p), the builtin sampler's convention.

Randomness: each row gets its own vLLM seed, drawn from the caller's ``torch.Generator``, so a run (and a
resumed run) samples reproducibly, though not the builtin sampler's stream: the two back ends agree in
distribution, not token for token (greedy decoding agrees token for token; tests/test_vllm.py checks both).

vLLM is an optional dependency in its own environment (``make .venv-vllm``: its CPU wheel pins an older
transformers than alignkit's default environment).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from functools import partial

import torch

from alignkit.rollout import Rollout, SamplingConfig, _plain_lora, _unwrap, _weight


def vllm_problem() -> str | None:
    """None when vLLM can be imported, else why not (for the start-up check of ``--generator vllm``)."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising anything at import
        return f"vLLM is not importable here ({type(error).__name__}: {str(error).splitlines()[0][:160]}); " \
               "build its environment with `make .venv-vllm` and run alignkit from .venv-vllm/bin"
    return None


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of every weight of ``model`` as it computes now: DDP/peft wrappers stripped,
    each LoRA layer's active deltas added to its base weight (the adapter tensors themselves left out), tied
    weights once. The names are those of the plain checkpoint, which vLLM's ``load_weights`` maps."""
    inner = _unwrap(model)
    wrapped = {}  # LoRA-wrapped module name -> module
    for name, module in inner.named_modules():
        if hasattr(module, "base_layer"):
            if not _plain_lora(module):
                raise ValueError(f"--generator vllm: adapter layer {name} ({type(module).__name__}) is not a plain "
                                 "LoRA (W + ΔW); merge it first or use --generator builtin")
            wrapped[name] = module
        elif hasattr(module, "original_module"):
            raise ValueError(f"--generator vllm: {name} is a peft modules_to_save wrapper; use --generator builtin")
    for name, param in inner.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if ".lora_" in name or name.startswith("lora_"):
            continue
        if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in wrapped:
            module = wrapped[owner.removesuffix(".base_layer")]
            leaf = name.rsplit(".", 1)[1]
            tensor = _weight(module)[0] if leaf == "weight" else getattr(module.base_layer, leaf)
            yield owner.removesuffix(".base_layer") + "." + leaf, tensor.detach()
        else:
            yield name, param.detach()


def kv_cache_bytes(config, dtype: str, max_model_len: int, max_num_seqs: int, cap: int = 2 << 30) -> int:
    """The KV cache to reserve: every sequence of a full batch at full length (2 · layers · kv_heads · head_dim
    values per token, K and V), capped at ``cap`` (2 GiB; vLLM queues what does not fit). vLLM's CPU default,
    a fraction of all memory, is refused when other processes hold memory."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * getattr(config, "num_key_value_heads", heads) * head_dim
    per_token *= 4 if dtype == "float32" else 2
    return int(min(cap, max(per_token * max_model_len * max_num_seqs, 16 * per_token * max_model_len)))


def _reload(worker, weights: list[tuple[str, torch.Tensor]], tied: bool) -> None:
    """Runs on vLLM's worker: its in-place ``reload_weights`` (the model's own ``load_weights``, which maps
    checkpoint names onto fused QKV and gate/up shards, then the post-load processing again: the CPU backend
    repacks linear weights for its GEMM kernels, so writing into the parameters alone would miss the kernels'
    copies). A tied LM head is reloaded as nothing (the checkpoint has no lm_head), so it is tied to the new
    embedding again and its kernel copy rebuilt from it."""
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    if tied:
        model = worker.model_runner.get_model()
        head, embed = model.lm_head, model.model.embed_tokens
        head.tie_weights(embed)
        head.quant_method.process_weights_after_loading(head)


class VLLMSampler:
    """``sampler(prompt_ids, sampling, generator) -> Rollout`` through a colocated ``vllm.LLM``.

    ``model``: the policy (plain, peft or DDP-wrapped); its weights are pushed at every call when
    ``follow_updates`` (online trainers), once at start otherwise (bon, evaluate). ``max_model_len``: longest
    prompt + response the engine must hold. ``dtype``: the engine's dtype ("float32" matches alignkit's fp32
    sampler here; "bfloat16" where the CPU/GPU has fast bf16)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_model_len: int, seed: int = 0,
                 follow_updates: bool = True, dtype: str = "float32", enforce_eager: bool = True,
                 max_num_seqs: int = 256):
        problem = vllm_problem()
        if problem:
            raise ValueError(f"--generator vllm: {problem}")
        # the engine core in this process: the model the trainer pushes into is reachable as a Python object
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.model, self.tokenizer, self.follow_updates = model, tokenizer, follow_updates
        inner = _unwrap(model)
        self._dir = tempfile.TemporaryDirectory(prefix="alignkit-vllm-")
        # config + tokenizer only: the weights are pushed. No generation_config.json: its EOS list or sampling
        # defaults would make vLLM stop or sample differently from the builtin sampler (EOS = the tokenizer's)
        inner.config.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        limit = getattr(inner.config, "max_position_embeddings", None) or max_model_len
        max_model_len = min(max_model_len, limit)
        self.llm = LLM(model=self._dir.name, load_format="dummy", dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
                       logprobs_mode="processed_logprobs",
                       kv_cache_memory_bytes=kv_cache_bytes(inner.config, dtype, max_model_len, max_num_seqs))
        self.eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.push()

    @torch.no_grad()
    def push(self) -> None:
        """Copy the policy's current (merged) weights into the engine and forget cached KV blocks."""
        weights = list(merged_weights(self.model))
        tied = bool(getattr(_unwrap(self.model).config, "tie_word_embeddings", False))
        self.llm.collective_rpc(partial(_reload, weights=weights, tied=tied))
        self.llm.reset_prefix_cache()

    def __call__(self, prompts: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.follow_updates:
            self.push()
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        params = [SamplingParams(
            n=1, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature, top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy else sampling.top_k, seed=seed,  # 0: off, as in alignkit
            stop_token_ids=self.eos_ids, ignore_eos=False, logprobs=0, detokenize=False,
        ) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        responses, logps, ended = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            responses.append(ids)
            # one {token: Logprob} dict per generated token, the sampled token's entry among them
            logps.append([step[t].logprob for t, step in zip(ids, completion.logprobs or [])] if completion.logprobs
                         else [0.0] * len(ids))
            ended.append(bool(ids) and ids[-1] in self.eos_ids)
        return _as_rollout(prompts, responses, logps, ended, self.pad_id)

    def close(self) -> None:
        self._dir.cleanup()


def _as_rollout(prompts: list[list[int]], responses: list[list[int]], logps: list[list[float]],
                ended: list[bool], pad_id: int) -> Rollout:
    """alignkit's Rollout layout: prompts left-padded, responses right-padded (at least one column)."""
    batch, width = len(prompts), max(map(len, prompts))
    length = max(1, max(map(len, responses)))
    prompt_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, width), dtype=torch.long)
    response_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.long)
    logprobs = torch.zeros((batch, length), dtype=torch.float32)
    for b, (prompt, response, lp) in enumerate(zip(prompts, responses, logps, strict=True)):
        prompt_ids[b, width - len(prompt):] = torch.tensor(prompt)
        prompt_mask[b, width - len(prompt):] = 1
        if response:
            response_ids[b, : len(response)] = torch.tensor(response)
            response_mask[b, : len(response)] = 1
            logprobs[b, : len(response)] = torch.tensor(lp, dtype=torch.float32)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, logprobs, torch.tensor(ended))
