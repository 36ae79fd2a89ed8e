"""A small client for OpenAI-compatible HTTP endpoints (``alignkit serve``, vLLM, llama.cpp's server, hosted APIs).

POST JSON to ``{base_url}/completions`` or ``{base_url}/chat/completions`` with a time-out; connection errors,
time-outs, HTTP 429 and 5xx are retried with exponential back-off (``backoff``·2^k seconds before retry k); other
4xx answers fail at once with the server's message. The API key comes from an environment variable (never from a
flag, so it stays out of shell history and configs). ``map`` runs requests on at most ``concurrency`` threads.
Standard library only.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HTTPStatusError(RuntimeError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class OpenAIClient:
    def __init__(self, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.5, concurrency: int = 8):
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, max(1, concurrency)

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/{path.lstrip('/')}"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                                            timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:300]
                if error.code not in RETRY_STATUS or attempt == self.retries:
                    raise HTTPStatusError(f"{url} answered HTTP {error.code}: {detail}", error.code) from error
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if attempt == self.retries:
                    raise ConnectionError(f"{url} unreachable after {attempt + 1} attempts: {error}") from error
            time.sleep(self.backoff * 2**attempt)
        try:
            answer = json.loads(body)
        except ValueError as error:
            raise ValueError(f"{url} answered non-JSON: {body[:200]!r}") from error
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
            raise ValueError(f"{url}: expected an OpenAI answer with 'choices', got {body[:200]!r}")
        return answer

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]`` with at most ``concurrency`` requests in flight, results in input order."""
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
             **extra: Any) -> dict[str, Any]:
        payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra}
        return self.post("chat/completions", payload)

    def complete(self, model: str, prompt: str, max_tokens: int, temperature: float = 0.0,
                 **extra: Any) -> dict[str, Any]:
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
        return self.post("completions", payload)


def choice_text(answer: dict[str, Any]) -> str:
    """The generated text of the first choice (chat or completions shape)."""
    choice = answer["choices"][0]
    if isinstance(choice.get("message"), dict):
        return choice["message"].get("content") or ""
    return choice.get("text") or ""
