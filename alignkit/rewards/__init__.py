"""Reward sources: ``source(prompts, completions, **kw) -> (B,) float32 tensor`` (see ``base``)."""

import importlib
import inspect
from pathlib import Path

from alignkit.rewards.base import RewardSource
from alignkit.rewards.functions import (
    ExactMatch,
    FunctionReward,
    exact_match_reward,
    length_reward,
    normalize_answer,
    regex_reward,
    vader_sentiment,
)
from alignkit.rewards.http import HTTPReward
from alignkit.rewards.model import RewardModelSource, sequence_scores, tokenizer_fingerprint

__all__ = [
    "ExactMatch",
    "FunctionReward",
    "HTTPReward",
    "RewardModelSource",
    "RewardSource",
    "exact_match_reward",
    "length_reward",
    "load_reward",
    "normalize_answer",
    "regex_reward",
    "sequence_scores",
    "tokenizer_fingerprint",
    "vader_sentiment",
]

SPECS = """\
  vader             VADER compound sentiment of the completion
  length:N          -|words - N|
  regex:PATTERN     1 if PATTERN is found in the completion, else 0
  exact             exact match against the `references` column
  http(s)://...     an HTTP reward service
  PATH              a reward model directory (or an alignkit run directory)
  module:function   a Python function completion -> float, or a reward source (object or class)"""


def load_reward(spec: str) -> RewardSource:
    """Resolve a command-line reward spec (one of ``SPECS``) to a reward source."""
    kind, _, arg = spec.partition(":")
    if spec == "vader":
        return vader_sentiment
    if spec == "exact":
        return exact_match_reward()
    if kind == "length" and arg:
        return length_reward(target=int(arg))
    if kind == "regex" and arg:
        return regex_reward(arg)
    if spec.startswith(("http://", "https://")):
        return HTTPReward(spec)
    if Path(spec).is_dir():
        return RewardModelSource(spec)
    if arg and kind.replace(".", "").replace("_", "").isalnum():
        obj = importlib.import_module(kind)
        for part in arg.split("."):
            obj = getattr(obj, part)
        # A plain function is a per-sample reward; a class is built with no arguments; any other
        # callable object is taken as a batch source.
        if inspect.isfunction(obj):
            return FunctionReward(obj)
        source = obj() if inspect.isclass(obj) else obj
        if not callable(source):
            raise TypeError(f"reward {spec!r} is not callable")
        return source
    raise ValueError(f"unknown reward {spec!r}; expected one of:\n{SPECS}")
