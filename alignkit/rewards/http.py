"""A reward computed by an HTTP service (a verifier, a sandbox, a remote reward model).

Protocol: POST ``{"prompts": [...], "completions": [...]}`` as JSON, answer ``{"rewards": [...]}``
with one number per completion. Per-sample list keyword arguments (dataset columns such as
``references``) are sent along under their own names. Standard library only.
"""

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import torch

from alignkit.rewards.base import Prompt, as_rewards, check_batch


class HTTPReward:
    """POST batches of at most ``batch_size`` pairs to ``url``. Connection failures and timeouts are
    retried ``retries`` times, waiting ``backoff``·2^k seconds before retry k; an HTTP error status or a
    malformed answer fails at once with the server's message."""

    def __init__(
        self, url: str, timeout: float = 60.0, batch_size: int = 64, retries: int = 3, backoff: float = 0.5
    ):
        self.url = url
        self.timeout = timeout
        self.batch_size = batch_size
        self.retries = retries
        self.backoff = backoff
        self.name = "http"

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **kw: Any) -> torch.Tensor:
        n = check_batch(prompts, completions)
        columns = {k: v for k, v in kw.items() if isinstance(v, list | tuple) and len(v) == n}
        rewards = []
        for start in range(0, n, self.batch_size):
            part = slice(start, start + self.batch_size)
            payload = {"prompts": list(prompts[part]), "completions": list(completions[part])}
            payload.update({k: list(v[part]) for k, v in columns.items()})
            rewards.append(self._post(payload))
        return torch.cat(rewards) if rewards else torch.zeros(0)

    def _post(self, payload: dict[str, list]) -> torch.Tensor:
        n = len(payload["completions"])
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                    status = response.status
                break
            except urllib.error.HTTPError as error:  # the server answered: retrying will not help
                detail = error.read().decode(errors="replace")[:500]
                raise RuntimeError(
                    f"reward server {self.url} answered HTTP {error.code}: {detail}"
                ) from error
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if attempt == self.retries:
                    raise ConnectionError(
                        f"reward server {self.url} unreachable after {attempt + 1} attempts: {error}"
                    ) from error
                time.sleep(self.backoff * 2**attempt)
        if status != 200:  # e.g. 204: urllib raises only for >= 400
            raise RuntimeError(f"reward server {self.url} answered HTTP {status}, expected 200")
        try:
            rewards = json.loads(body)["rewards"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"reward server {self.url} must answer {{'rewards': [...]}}, got {body[:200]!r}"
            ) from error
        if not isinstance(rewards, list):
            raise ValueError(
                f"reward server {self.url}: 'rewards' must be a list, got {type(rewards).__name__}"
            )
        return as_rewards(rewards, n, f"reward server {self.url}")
