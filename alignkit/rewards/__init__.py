"""Reward sources: ``source(prompts, completions, **kw) -> (B,) float32 tensor`` (see ``base``)."""

import importlib
import inspect
import re
from pathlib import Path
from urllib.parse import urlparse

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
    "reward_spec_problem",
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


def reward_spec_problem(spec: str) -> str | None:
    """What is wrong with a reward spec, checked at start-up without loading a model or calling a server (a
    ``module:function`` is imported); None when it is well-formed. One line, for ``--reward``."""
    kind, _, arg = spec.partition(":")
    if spec in ("vader", "exact"):
        return None
    if kind == "length" and arg:
        return None if arg.lstrip("-").isdigit() else "length:N needs an integer N (the target number of words)"
    if kind == "regex" and arg:
        try:
            re.compile(arg)
        except re.error as e:
            return f"invalid regular expression ({e})"
        return None
    if spec.startswith(("http://", "https://")):
        return None if urlparse(spec).netloc else "expected http(s)://host[:port]/path"
    if Path(spec).is_dir():
        return None
    if _MODULE_FUNCTION.fullmatch(spec):
        try:
            _import_object(kind, arg)
        except ValueError as e:
            return str(e)
        return None
    if spec.startswith(("/", ".", "~")) or "/" in spec:
        return "no such reward-model directory"
    return "unknown reward; expected " + ", ".join(line.split()[0] for line in SPECS.splitlines())


_MODULE_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _import_object(module: str, attribute: str):
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import module {module!r} ({e})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


def load_reward(spec: str) -> RewardSource:
    """Resolve a command-line reward spec (one of ``SPECS``) to a reward source."""
    problem = reward_spec_problem(spec)
    if problem:
        raise ValueError(f"reward {spec!r}: {problem}")
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
    obj = _import_object(kind, arg)
    # A plain function is a per-sample reward; a class is built with no arguments; any other
    # callable object is taken as a batch source.
    if inspect.isfunction(obj):
        return FunctionReward(obj)
    source = obj() if inspect.isclass(obj) else obj
    if not callable(source):
        raise ValueError(f"reward {spec!r} is not callable")
    return source
