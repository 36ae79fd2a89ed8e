"""Where the samples of a stage whose model does not change come from: ``--generator builtin|http://HOST:PORT/v1``.

- ``builtin``: alignkit's own batched sampler (``alignkit.rollout.sample``) on the loaded model;
- an OpenAI-compatible endpoint (``alignkit serve``, vLLM's server, llama.cpp's server, a hosted API), written
  ``http://HOST:PORT[/v1]`` or ``http://HOST:PORT/v1|MODEL`` to pick a served model (default: the first listed).
  String prompts go to /v1/completions, message lists to /v1/chat/completions, ``n`` samples per request, with the
  sampling settings of the stage (temperature, top_p, max_tokens) and a per-prompt seed. The API key comes from
  ALIGNKIT_API_KEY; retries, back-off and the concurrency limit are the client's (``alignkit.serve.client``).

Online trainers keep the builtin sampler: their policy changes after every update.
"""

from __future__ import annotations

from alignkit.rollout import SamplingConfig

BUILTIN = "builtin"


def generator_problem(spec: str) -> str | None:
    """None when ``spec`` names a generator, else what was expected (for the start-up option check)."""
    if spec == BUILTIN or spec.startswith(("http://", "https://")) and len(spec.split("://", 1)[1].split("|")[0]) > 0:
        return None
    return "expected builtin or an OpenAI-compatible endpoint http://HOST:PORT/v1 (optionally |MODEL)"


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


__all__ = ["BUILTIN", "endpoint_samples", "generator_problem", "split_spec"]
