"""``alignkit serve``: an OpenAI-compatible HTTP server over any alignkit run dir, HF model or the bundled model.

    alignkit serve --model runs/dpo --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "runs/dpo", "prompt": "The movie was", "max_tokens": 16, "logprobs": 5}'

Endpoints (the shapes of OpenAI's API, so the official ``openai`` client works unchanged):

* ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served; its id is ``--served-name`` or ``--model``.
* ``POST /v1/completions``: ``prompt`` (a string, a list of strings, or token ids), ``max_tokens`` (default 16),
  ``temperature`` (0 = greedy), ``top_p``, ``n``, ``stop`` (up to 4 strings), ``seed``, ``logprobs`` (int k:
  each token's log-prob and the k most likely alternatives, k <= 20), ``echo``, ``stream``.
* ``POST /v1/chat/completions``: ``messages`` (rendered by the tokenizer's chat template), ``max_tokens`` or
  ``max_completion_tokens``, the same sampling fields, ``logprobs`` (bool) + ``top_logprobs`` (int), ``stream``.
* Both also take vLLM's ``min_tokens`` (no EOS before that many tokens). Other unknown fields are ignored, as
  OpenAI-compatible servers do; known fields of the wrong type are a 400.

Log-probs are the model's own (temperature 1, before top_p), from a forward over prompt + response (when
streaming, from each decode step's logits). Streaming sends server-sent events (``data: {chunk}`` ...
``data: [DONE]``) live: one chunk per generated token, sent as soon as the sampler has drawn it, choices of
``n > 1`` interleaved by ``index``, log-probs in each token's chunk, ``finish_reason`` on a choice's last chunk,
``usage`` in a last chunk when ``stream_options.include_usage``. Text that may begin a stop string is held back
until the next token settles it, so a streamed answer is exactly the non-streamed one. A client that disconnects,
or rows ended by a stop string, stop their batch early. Requests that arrive together are batched through
``alignkit.rollout.sample`` (see ``engine.py``); requests arriving while a batch decodes all join the next batch,
which starts as soon as the current one ends. A request with a ``seed`` is decoded on its own, so the same
request with the same seed gives the same answer.

Extension for judges, ``candidate_tokens``: on either endpoint, ``"candidate_tokens": ["1", "2"]`` (strings,
each exactly one token of the model's tokenizer, else HTTP 400 naming it) adds to every choice
``"candidate_logprobs": {"1": -0.31, "2": -1.42}``: the log-probability of each candidate as the FIRST
generated token, under the model's next-token distribution after the prompt, whether or not it is among the
top-k or is the token actually sampled. A judge gets P(first answer) = softmax over the pair from one request
with ``max_tokens: 1``. (When streaming, it rides on each choice's last chunk.)

Safety: binds 127.0.0.1 unless ``--host`` says otherwise; with ``--api-key-env NAME`` (or ``ALIGNKIT_API_KEY``
set) every request needs ``Authorization: Bearer KEY`` (401 otherwise); bodies over ``--max-body-bytes`` get
413, ``max_tokens`` over ``--max-tokens-cap`` 400, more than ``--max-pending`` queued requests 429; malformed
JSON, wrong types, missing fields or an unknown model get a 4xx with OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``.

``alignkit.serve.client`` is the matching client (time-outs, retries with back-off, a concurrency limit).
"""

from __future__ import annotations

import os

from alignkit.config import checked
from alignkit.data import DataError
from alignkit.serve.app import APIError, ServeConfig, create_app

__all__ = ["APIError", "ServeConfig", "create_app", "resolve_api_key", "run"]


def resolve_api_key(config: ServeConfig) -> str | None:
    """The bearer token from ``--api-key-env NAME`` (which must then be set), else $ALIGNKIT_API_KEY, else None."""
    if config.api_key_env:
        key = os.environ.get(config.api_key_env, "")
        if not key:
            raise DataError(f"--api-key-env {config.api_key_env}: that environment variable is not set or empty")
        return key
    return os.environ.get("ALIGNKIT_API_KEY") or None


def _check(config: ServeConfig) -> None:
    for flag, value, low in (("--port", config.port, 0), ("--max-batch", config.max_batch, 1),
                             ("--max-tokens-cap", config.max_tokens_cap, 1),
                             ("--default-max-tokens", config.default_max_tokens, 1), ("--max-n", config.max_n, 1),
                             ("--max-body-bytes", config.max_body_bytes, 1), ("--max-pending", config.max_pending, 1)):
        if value < low:
            raise DataError(f"{flag} must be at least {low}, got {value}")
    if config.port > 65535:
        raise DataError(f"--port must be at most 65535, got {config.port}")
    if config.batch_wait_ms < 0:
        raise DataError(f"--batch-wait-ms must be >= 0, got {config.batch_wait_ms}")
    if config.dtype not in ("auto", "fp32", "bf16"):
        raise DataError(f"--dtype must be auto, fp32 or bf16, got {config.dtype!r}")


@checked
def run(config: ServeConfig) -> None:
    """Load the model and serve it until Ctrl-C."""
    import uvicorn

    from alignkit.models import load_model

    _check(config)
    api_key = resolve_api_key(config)
    try:
        model, tokenizer = load_model(config.model)
    except (OSError, ValueError) as error:  # a missing directory, an unknown hub id offline, a broken config
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--model {config.model}: cannot load it: {first_line}") from None
    app = create_app(model.requires_grad_(False), tokenizer, config, api_key=api_key)  # frozen: see rollout._decoder
    name = config.served_name or config.model
    auth = "bearer token required" if api_key else "no auth"
    print(f"alignkit serve: {name!r} at http://{config.host}:{config.port}/v1 ({auth}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
