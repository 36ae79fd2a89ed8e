"""Rewards computed by plain Python functions: sentiment, length, format (regex), exact match."""

import functools
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from alignkit.rewards.base import Prompt, as_rewards, check_batch


class FunctionReward:
    """A per-sample function ``fn(completion) -> float`` (or ``fn(prompt, completion)`` with
    ``with_prompt=True``) used as a reward source. Works as a decorator: ``@FunctionReward``."""

    def __init__(self, fn: Callable[..., float], with_prompt: bool = False, name: str | None = None):
        self.fn = fn
        self.with_prompt = with_prompt
        self.name = name or getattr(fn, "__name__", "function")
        functools.update_wrapper(self, fn)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **kw: Any) -> torch.Tensor:
        n = check_batch(prompts, completions)
        if self.with_prompt:
            values = [self.fn(p, c) for p, c in zip(prompts, completions, strict=True)]
        else:
            values = [self.fn(c) for c in completions]
        return as_rewards(values, n, f"reward function {self.name!r}")


# ---------------------------------------------------------------------------------------------------
# Sentiment: the ground-truth reward of the DPO paper's controlled-sentiment task (Rafailov et al. 2023,
# https://arxiv.org/abs/2305.18290, section 6.1), with VADER (Hutto & Gilbert 2014) standing in for the
# paper's IMDb sentiment classifier.


@functools.cache
def _vader_analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound score of ``text``, in [-1, 1]: > 0 positive, < 0 negative."""
    return float(_vader_analyzer().polarity_scores(text)["compound"])


vader_sentiment = FunctionReward(vader_compound, name="vader")


# ---------------------------------------------------------------------------------------------------
# Length


def length_reward(
    target: int | None = None, scale: float = 1.0, unit: Literal["words", "chars"] = "words"
) -> FunctionReward:
    """Reward on the completion's length n (whitespace-separated words, or characters).

    With a target: r = −scale·|n − target| (0 at the target, lower the further away).
    Without one:   r = scale·n (scale > 0 rewards length, scale < 0 is a length penalty).
    """
    if unit not in ("words", "chars"):
        raise ValueError(f"unit must be 'words' or 'chars', got {unit!r}")

    def length(completion: str) -> float:
        n = len(completion.split()) if unit == "words" else len(completion)
        return -scale * abs(n - target) if target is not None else scale * n

    return FunctionReward(length, name=f"length:{target}" if target is not None else "length")


# ---------------------------------------------------------------------------------------------------
# Format check


def regex_reward(
    pattern: str, fullmatch: bool = False, flags: int = 0, match: float = 1.0, miss: float = 0.0
) -> FunctionReward:
    """``match`` when the completion matches ``pattern`` (``re.search``, or ``re.fullmatch`` with
    ``fullmatch=True``), else ``miss``. E.g. ``regex_reward(r"<think>.*</think>\\s*<answer>.*</answer>",
    fullmatch=True, flags=re.DOTALL)`` for a reasoning-format reward."""
    compiled = re.compile(pattern, flags)
    find = compiled.fullmatch if fullmatch else compiled.search

    def regex(completion: str) -> float:
        return match if find(completion) is not None else miss

    return FunctionReward(regex, name=f"regex:{pattern}")


# ---------------------------------------------------------------------------------------------------
# Exact match against a reference answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation (Rajpurkar et al. 2016): lower-case, drop punctuation and the articles
    a/an/the, collapse whitespace. "The Answer: 1,000." -> "answer 1000"."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


class ExactMatch:
    """1.0 when the (extracted, normalised) completion equals a normalised reference answer, else 0.0.

    References come per call as ``references=[...]`` aligned with the prompts (a dataset column), or
    from the ``references`` mapping given here, keyed by prompt text (for a message list: the content
    of its last message). A reference may be a list of accepted answers. ``extract`` is a regex whose
    last match in the completion is the answer (its first group if it has one), e.g. ``r"####\\s*(.+)"``
    for GSM8K; a completion without a match scores 0.
    """

    def __init__(
        self,
        references: Mapping[str, str | Sequence[str]] | None = None,
        extract: str | None = None,
        normalize: Callable[[str], str] = normalize_answer,
    ):
        self.references = references
        self.extract = re.compile(extract) if extract is not None else None
        self.normalize = normalize
        self.name = "exact"

    def _reference(self, prompt: Prompt) -> str | Sequence[str]:
        key = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if self.references is None or key not in self.references:
            raise KeyError(f"exact match: no reference for prompt {key[:80]!r}; pass references=[...]")
        return self.references[key]

    def _answer(self, completion: str) -> str | None:
        if self.extract is None:
            return completion
        matches = list(self.extract.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if self.extract.groups else last.group(0)

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        references: Sequence[str | Sequence[str]] | None = None,
        **kw: Any,
    ) -> torch.Tensor:
        n = check_batch(prompts, completions)
        if references is None:
            references = [self._reference(p) for p in prompts]
        elif len(references) != n:
            raise ValueError(f"exact match: got {len(references)} references for {n} completions")
        values = []
        for completion, reference in zip(completions, references, strict=True):
            answer = self._answer(completion)
            accepted = [reference] if isinstance(reference, str) else reference
            hit = answer is not None and self.normalize(answer) in {self.normalize(r) for r in accepted}
            values.append(1.0 if hit else 0.0)
        return torch.tensor(values, dtype=torch.float32)


def exact_match_reward(
    references: Mapping[str, str | Sequence[str]] | None = None, extract: str | None = None
) -> ExactMatch:
    """See ``ExactMatch``."""
    return ExactMatch(references, extract)
