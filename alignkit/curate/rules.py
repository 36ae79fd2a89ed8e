"""LIMA-style quality rules: each a named function ``rule(view, settings) -> detail or None`` (None: passes).

LIMA (Zhou et al. 2023, https://arxiv.org/abs/2305.11206) hand-picked 1,000 examples for quality and
diversity; these rules are the mechanical part of that filter, in the spirit of the Gopher/C4 heuristics
(Rae et al. 2021, https://arxiv.org/abs/2112.11446, appendix A): cheap, O(length) per row, each switchable.

Precise definitions (``r`` = the response, see ``text.view``; ``w(x)`` = normalised words of x):

- ``length``: r shorter than ``min_length`` or longer than ``max_length`` (whitespace words, or tokens of a
  tokenizer with ``--length-unit tokens:MODEL``); a prompt-only record: its prompt longer than ``max_length``.
- ``repetition``: with g = the word n-grams of r (n = ``repetition_n``) and |g| >= 4,
  1 - |set(g)| / |g| > ``max_repetition`` (share of n-grams that repeat an earlier one).
- ``junk``: prompt or r holds U+FFFD (a decoding failure) or a control character: C0 (U+0000-U+001F) other
  than tab, newline and carriage return, DEL (U+007F), or C1 (U+0080-U+009F).
- ``empty``: r is empty or whitespace only.
- ``truncated``: r (stripped) has more than 3 words and its last character is a letter, a digit, or one of
  ``, ; : - ( [ {`` with no terminal punctuation (. ! ? … ) ] } " ' ` * and closing quotes) after it, i.e. it
  ends mid-sentence or mid-word. Short answers ("Paris") are not judged.
- ``echo``: w(r) is non-empty and equals w(prompt) or is a contiguous part of it (the answer repeats the prompt).
- ``refusal``: r matches a boilerplate refusal pattern (``REFUSALS`` plus ``refusal_patterns``), case-insensitive.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.curate.text import View, words


def count_words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class RuleSettings:
    min_length: int = 1
    max_length: int = 2048
    repetition_n: int = 3
    max_repetition: float = 0.3
    refusal: re.Pattern | None = None
    count: Callable[[str], int] = count_words  # the length unit: words, or tokens of a tokenizer


def length_counter(unit: str) -> Callable[[str], int]:
    """``words`` -> whitespace words; ``tokens:MODEL`` -> tokens of MODEL's tokenizer (no special tokens)."""
    if unit == "words":
        return count_words
    from alignkit.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(unit[len("tokens:"):])
    except (OSError, ValueError) as e:
        raise ValueError(f"--length-unit {unit!r}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


REFUSALS = [
    r"\bas an ai(?: language)? model\b",
    r"\bas a (?:large )?language model\b",
    r"\bas an ai assistant\b",
    r"\bi(?: a|')m (?:just )?an ai\b",
    r"\bi (?:cannot|can't|can not|am unable to|won't) (?:help|assist) with\b",
    r"\bi(?:'m| am) (?:sorry|afraid),? but i (?:cannot|can't|am unable to|won't)\b",
    r"\bi(?:'m| am) not able to (?:help|assist|provide)\b",
]

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_TERMINAL = set(".!?…)]}\"'`*”’»。！？")
_MID = set(",;:-([{")


def refusal_pattern(extra: str = "") -> re.Pattern:
    """REFUSALS plus ``extra`` (``|``-separated regexes) as one compiled case-insensitive pattern."""
    patterns = REFUSALS + ([extra] if extra else [])
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


def length(v: View, s: RuleSettings) -> str | None:
    if v.response is None:
        n = s.count(v.prompt)
        return f"prompt length {n} > {s.max_length}" if n > s.max_length else None
    n = s.count(v.response)
    if n < s.min_length:
        return f"length {n} < {s.min_length}"
    return f"length {n} > {s.max_length}" if n > s.max_length else None


def repetition(v: View, s: RuleSettings) -> str | None:
    if not v.response:
        return None
    w = words(v.response)
    grams = [tuple(w[i:i + s.repetition_n]) for i in range(len(w) - s.repetition_n + 1)]
    if len(grams) < 4:
        return None
    ratio = 1.0 - len(set(grams)) / len(grams)
    return f"{ratio:.2f} of {s.repetition_n}-grams repeated > {s.max_repetition}" if ratio > s.max_repetition else None


def junk(v: View, s: RuleSettings) -> str | None:
    for name, text in (("prompt", v.prompt), ("response", v.response or "")):
        m = _CONTROL.search(text)
        if m:
            return f"{name} has U+{ord(m.group()):04X} at character {m.start()}"
    return None


def empty(v: View, s: RuleSettings) -> str | None:
    return "empty response" if v.response is not None and not v.response.strip() else None


def truncated(v: View, s: RuleSettings) -> str | None:
    r = (v.response or "").strip()
    if len(r.split()) <= 3:
        return None
    last = r[-1]
    if last in _TERMINAL:
        return None
    if last.isalnum() or last in _MID:
        return f"ends with {r[-12:]!r}"
    return None


def echo(v: View, s: RuleSettings) -> str | None:
    if v.response is None:
        return None
    r, p = " ".join(words(v.response)), " ".join(words(v.prompt))
    if not r or not p:
        return None
    if r == p:
        return "response equals the prompt"
    # word-boundary containment: " a b " in " x a b y "
    return "response is contained in the prompt" if f" {r} " in f" {p} " else None


def refusal(v: View, s: RuleSettings) -> str | None:
    if not v.response or s.refusal is None:
        return None
    m = s.refusal.search(v.response)
    return f"matches {m.group()!r}" if m else None


# in the default order of --rules: the first rule that fires names the drop
RULES: dict[str, Callable[[View, RuleSettings], str | None]] = {
    "empty": empty, "junk": junk, "length": length, "echo": echo, "refusal": refusal,
    "repetition": repetition, "truncated": truncated,
}
