"""What curation looks at in a record: its prompt, its response, and one normalised text for hashing/embedding.

Every record shape the data layer reads is viewed the same way (nothing here validates or rewrites a record;
``curated.jsonl`` keeps the original dicts):

- ``prompt``/``completion`` (strings or message lists), unpaired ``prompt``/``completion``/``label``;
- ``messages``: the prompt is every turn before the last assistant turn, the response that turn;
- ``text``: no prompt, the text is the response;
- preferences ``prompt``/``chosen``/``rejected`` (or implicit ``chosen``/``rejected``): the response is
  ``chosen`` (the rejected answer is expected to be worse, so quality rules do not judge it), while hashing and
  embedding see prompt + chosen + rejected, so two pairs on one prompt are not duplicates of each other;
- ranked ``prompt``/``responses``/``scores``: the response is the highest-scored one;
- prompt-only ``prompt``: no response (response rules are skipped, the prompt is checked for junk/length).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class View:
    prompt: str
    response: str | None  # None: the record has no response (prompt-only)
    full: str  # everything that identifies the example (hashing, embedding)


def as_text(value: Any) -> str:
    """A string as is; a message list as its contents joined by blank lines; anything else as ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return ""


def view(data: dict[str, Any]) -> View:
    if "chosen" in data and "rejected" in data:
        prompt, chosen, rejected = as_text(data.get("prompt")), as_text(data["chosen"]), as_text(data["rejected"])
        return View(prompt, chosen, f"{prompt}\n\n{chosen}\n\n{rejected}")
    if "responses" in data and isinstance(data["responses"], list) and data["responses"]:
        scores = data.get("scores") if isinstance(data.get("scores"), list) else []
        best = max(range(len(data["responses"])), key=lambda i: _number(scores[i]) if i < len(scores) else 0.0)
        prompt = as_text(data.get("prompt"))
        return View(prompt, as_text(data["responses"][best]), prompt + "\n\n" + "\n\n".join(map(as_text, data["responses"])))
    if "messages" in data and isinstance(data["messages"], list):
        messages = [m for m in data["messages"] if isinstance(m, dict)]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            text = as_text(messages)
            return View(text, None, text)
        prompt, response = as_text(messages[:last]), as_text(messages[last:last + 1])
        return View(prompt, response, as_text(messages))
    if "text" in data and "prompt" not in data:
        text = as_text(data["text"])
        return View("", text, text)
    prompt = as_text(data.get("prompt"))
    if "completion" in data:
        response = as_text(data["completion"])
        return View(prompt, response, f"{prompt}\n\n{response}")
    return View(prompt, None, prompt)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("-inf")


_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation removed, whitespace collapsed: what "the same text" means for exact dedup."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def text_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the normalised text (exact-dedup key, embedding-cache key)."""
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def words(text: str) -> list[str]:
    return normalise(text).split()
