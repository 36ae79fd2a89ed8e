"""Where samples come from: ``--generator builtin|vllm|http://HOST:PORT/v1``, one interface, three back ends.

- ``builtin``: alignkit's own batched sampler (``alignkit.rollout.sample``) on the loaded model;
- ``vllm``: a vLLM engine in this process (``alignkit.generation.vllm``), built from the policy's config and
  tokenizer and fed its current weights (LoRA merged) before every rollout, as TRL's colocate mode and OpenRLHF
  do; rollouts come back as token ids and the trainers recompute log-probs with their training forward as with
  ``builtin``. For the online trainers (ppo, grpo, rloo, raft) and for bon and evaluate;
- an OpenAI-compatible endpoint (``alignkit serve``, vLLM's server, llama.cpp's server, a hosted API), written
  ``http://HOST:PORT[/v1]`` or ``http://HOST:PORT/v1|MODEL`` to pick a served model (default: the first listed),
  for stages whose model does not change (bon, evaluate, critique). String prompts go to /v1/completions,
  message lists to /v1/chat/completions, ``n`` samples per request, with the sampling settings of the stage
  (temperature, top_p, max_tokens) and a per-prompt seed. The API key comes from ALIGNKIT_API_KEY; retries,
  back-off and the concurrency limit are the client's (``alignkit.serve.client``).

A ``Sampler`` is ``sampler(prompt_ids, sampling, generator) -> Rollout``; ``make_sampler`` builds the one a
``--generator`` names (``builtin`` or ``vllm``: the endpoint returns text, see ``endpoint_samples``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignkit.config import arg
from alignkit.rollout import Rollout, SamplingConfig

BUILTIN = "builtin"
VLLM = "vllm"

Sampler = Callable[[list[list[int]], SamplingConfig, "torch.Generator | None"], Rollout]


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def generator_problem(spec: str) -> str | None:
    """None when ``spec`` names a generator, else what was expected (for the start-up option check)."""
    if spec == VLLM:
        return _vllm_problem()
    if spec == BUILTIN or is_endpoint(spec) and len(spec.split("://", 1)[1].split("|")[0]) > 0:
        return None
    return "expected builtin, vllm or an OpenAI-compatible endpoint http://HOST:PORT/v1 (optionally |MODEL)"


def online_generator_problem(spec: str) -> str | None:
    """As ``generator_problem`` for trainers whose policy changes after every update: no fixed endpoint."""
    if spec == VLLM:
        return _vllm_problem()
    if spec == BUILTIN:
        return None
    if is_endpoint(spec):
        return "expected builtin or vllm: the policy changes after every update, an endpoint serves a fixed model"
    return "expected builtin or vllm"


def _vllm_problem() -> str | None:
    from alignkit.generation.vllm import vllm_problem  # imports vLLM (~15 s): only when it is asked for

    return vllm_problem()


def generator_arg(online: bool = False):
    """The ``--generator`` field of a command's config (online trainers: builtin or vllm)."""
    if online:
        return arg(BUILTIN, "where rollouts are sampled: builtin, or vllm (colocated, fed the policy's weights "
                   "before every rollout; needs `make .venv-vllm`)", check=online_generator_problem)
    return arg(BUILTIN, "where samples come from: builtin, vllm (colocated engine), or an OpenAI-compatible endpoint "
               "http://HOST:PORT/v1 (|MODEL to pick one; alignkit serve, vLLM, llama.cpp)", check=generator_problem)


def make_sampler(spec: str, model, tokenizer, max_model_len: int, seed: int = 0, follow_updates: bool = True):
    """The ``Sampler`` of ``--generator spec`` over ``model`` (``builtin`` or ``vllm``); ``max_model_len`` bounds
    prompt + response tokens (vLLM preallocates its KV cache for it); ``follow_updates``: push the policy's
    weights into vLLM before every rollout (online trainers) rather than once."""
    if spec == BUILTIN:
        return None  # rollout_and_score's default: the builtin sampler on the model
    if spec == VLLM:
        from alignkit.generation.vllm import VLLMSampler

        return VLLMSampler(model, tokenizer, max_model_len, seed=seed, follow_updates=follow_updates)
    raise ValueError(f"--generator {spec}: an endpoint returns text, not rollouts; expected builtin or vllm here")


def split_spec(spec: str) -> tuple[str, str | None]:
    """(base URL, model or None) of an endpoint spec."""
    url, _, model = spec.partition("|")
    return url, model or None


def endpoint_samples(spec: str, prompts: list, n: int, sampling: SamplingConfig, seed: int) -> list[str]:
    """``n`` sampled texts per prompt from an OpenAI-compatible endpoint, prompt-major (rows p*n .. p*n+n-1 belong
    to prompt p), as the builtin sampler orders them."""
    from alignkit.serve.client import Client

    url, model = split_spec(spec)
    params = {"max_tokens": sampling.max_new_tokens, "temperature": 0.0 if sampling.greedy else sampling.temperature,
              "top_p": sampling.top_p, "n": n}
    with Client(url, model=model) as client:
        bodies = []
        for i, prompt in enumerate(prompts):
            key = "messages" if isinstance(prompt, list) else "prompt"
            bodies.append((("/chat/completions" if key == "messages" else "/completions"),
                           {key: prompt, "model": client.model, "seed": seed + i, **params}))
        answers = client.map_requests(bodies)
    texts = []
    for (path, _), answer in zip(bodies, answers, strict=True):
        choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise ValueError(f"--generator {url}: asked for {n} samples, the server returned {len(choices)}")
        texts += [c["message"]["content"] if path == "/chat/completions" else c["text"] for c in choices]
    return texts


__all__ = ["BUILTIN", "VLLM", "Sampler", "endpoint_samples", "generator_arg", "generator_problem", "is_endpoint",
           "make_sampler", "online_generator_problem", "split_spec"]
