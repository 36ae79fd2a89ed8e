"""A small client for OpenAI-compatible servers (``alignkit serve``, vLLM, llama.cpp's server, hosted APIs).

    client = Client("http://127.0.0.1:8000")            # model: the first one /v1/models lists
    [r] = client.complete(["Which is better, A or B? Answer:"], max_tokens=1, candidate_tokens=[" A", " B"])
    r.text, r.candidate_logprobs                          # candidate_logprobs: alignkit serve's extension
    client.chat([[{"role": "user", "content": "Hi"}]], max_tokens=32, logprobs=5)

Every prompt is its own HTTP request, sent concurrently by at most ``max_concurrency`` threads (one semaphore
per client, so threads sharing a client share the limit too); ``alignkit serve`` batches the requests that
arrive together. Connection errors, time-outs, 429 and 5xx answers are retried ``retries`` times, waiting
``backoff``·2^k seconds (or the server's Retry-After, if larger) plus up to 10% jitter before retry k; any other
4xx fails at once with the server's message. The API key comes from ``api_key`` or the environment variable
``api_key_env`` (default ALIGNKIT_API_KEY), sent as a bearer token.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_WAIT = 30.0  # seconds, the longest single back-off


class RequestError(ValueError):
    """The server rejected the request (a 4xx other than 429): retrying would not help."""


class ServerError(RuntimeError):
    """The server stayed unreachable or kept failing (429/5xx) through every retry."""


@dataclass
class Result:
    """One choice of a completion or chat answer, the same fields for both endpoints."""

    text: str
    finish_reason: str | None
    tokens: list[str] | None = None  # with logprobs: the generated tokens as text
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None  # per token: alternative -> log-prob
    candidate_logprobs: dict[str, float] | None = None  # alignkit serve's candidate_tokens extension
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the choice as the server sent it


class Client:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 api_key_env: str = "ALIGNKIT_API_KEY", timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.5, max_concurrency: int = 8):
        if max_concurrency < 1 or retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("need max_concurrency >= 1, retries >= 0, backoff >= 0, timeout > 0")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.api_key = api_key if api_key is not None else (os.environ.get(api_key_env) or None)
        self.retries, self.backoff, self.max_concurrency = retries, backoff, max_concurrency
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._model = model

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def model(self) -> str:
        """The model id sent with every request: the one given, else the first one the server lists."""
        if self._model is None:
            models = self.models()
            if not models:
                raise ServerError(f"{self.base_url}/models lists no model; pass model=")
            self._model = models[0]
        return self._model

    def models(self) -> list[str]:
        return [m["id"] for m in self.request("GET", "/models")["data"]]

    # -- the two endpoints ----------------------------------------------------------------------------------

    def complete(self, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                 logprobs: int | None = None, candidate_tokens: list[str] | None = None, **params) -> list[Result]:
        """One result per prompt (``n`` > 1 in params: the first choice; see `request` for all of them)."""
        def body(prompt):
            return {"prompt": prompt, **self._params(max_tokens, temperature, candidate_tokens, params),
                    **({"logprobs": logprobs} if logprobs is not None else {})}

        return self._map("/completions", [body(p) for p in prompts], _completion_result)

    def chat(self, conversations: list[list[dict]], max_tokens: int = 256, temperature: float = 0.0,
             logprobs: int | None = None, candidate_tokens: list[str] | None = None, **params) -> list[Result]:
        """One result per conversation (a list of {"role", "content"} messages); logprobs k = top_logprobs."""
        def body(messages):
            out = {"messages": messages, **self._params(max_tokens, temperature, candidate_tokens, params)}
            if logprobs is not None:
                out.update(logprobs=True, top_logprobs=logprobs)
            return out

        return self._map("/chat/completions", [body(c) for c in conversations], _chat_result)

    def _params(self, max_tokens, temperature, candidate_tokens, params) -> dict:
        out = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, **params}
        if candidate_tokens is not None:
            out["candidate_tokens"] = list(candidate_tokens)
        return out

    def _map(self, path: str, bodies: list[dict], parse) -> list[Result]:
        if not bodies:
            return []
        if len(bodies) == 1:
            return [parse(self.request("POST", path, bodies[0])["choices"][0])]
        with ThreadPoolExecutor(min(self.max_concurrency, len(bodies))) as pool:
            answers = list(pool.map(lambda b: self.request("POST", path, b), bodies))
        return [parse(a["choices"][0]) for a in answers]

    def map_requests(self, requests: list[tuple[str, dict]]) -> list[dict]:
        """The raw answers of several POST requests ``(path, body)``, sent concurrently under this client's limit,
        in order (for callers that need every choice of ``n``)."""
        if not requests:
            return []
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self.request("POST", *r), requests))

    # -- one request, with retries --------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """Send one request (at most ``max_concurrency`` at a time per client); the decoded JSON answer."""
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            with self._slots:
                try:
                    response = self._http.request(method, url, json=body)
                except httpx.TransportError as error:  # refused, reset, timed out
                    if last:
                        raise ServerError(f"{url}: unreachable after {attempt + 1} attempts: "
                                          f"{type(error).__name__}: {error}") from error
                    response = None
            if response is not None:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServerError(f"{url}: answer is not JSON: {response.text[:200]!r}") from None
                message = _error_message(response)
                if response.status_code not in RETRY_STATUS:
                    raise RequestError(f"{url}: HTTP {response.status_code}: {message}")
                if last:
                    raise ServerError(f"{url}: HTTP {response.status_code} after {attempt + 1} attempts: {message}")
            time.sleep(self._wait(attempt, response))
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, response: httpx.Response | None) -> float:
        wait = self.backoff * 2**attempt
        retry_after = response.headers.get("retry-after", "") if response is not None else ""
        try:
            wait = max(wait, float(retry_after))
        except ValueError:
            pass
        wait = min(wait, MAX_WAIT)
        return wait + random.uniform(0, 0.1 * wait)  # jitter: clients that failed together do not retry together


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _completion_result(choice: dict) -> Result:
    lp = choice.get("logprobs") or {}
    return Result(
        text=choice.get("text", ""),
        finish_reason=choice.get("finish_reason"),
        tokens=lp.get("tokens"),
        token_logprobs=lp.get("token_logprobs"),
        top_logprobs=lp.get("top_logprobs"),
        candidate_logprobs=choice.get("candidate_logprobs"),
        raw=choice,
    )


def _chat_result(choice: dict) -> Result:
    content = (choice.get("logprobs") or {}).get("content")
    result = Result(
        text=(choice.get("message") or {}).get("content") or "",
        finish_reason=choice.get("finish_reason"),
        candidate_logprobs=choice.get("candidate_logprobs"),
        raw=choice,
    )
    if content is not None:
        result.tokens = [c["token"] for c in content]
        result.token_logprobs = [c["logprob"] for c in content]
        result.top_logprobs = [{t["token"]: t["logprob"] for t in c.get("top_logprobs") or []} for c in content]
    return result
