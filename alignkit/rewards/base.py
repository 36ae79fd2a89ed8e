"""The reward-source interface: a batch of (prompt, completion) in, one float reward per pair out.

Every reward in alignkit (Python functions, reward models, HTTP services, later AI judges) is a plain
callable with this shape, so RL trainers, best-of-N and evaluation treat them alike:

    rewards = source(prompts, completions, **kw)        # (B,) float32 tensor

``prompts`` are raw prompt texts or chat message lists (``[{"role": ..., "content": ...}, ...]``),
never a prompt already rendered with the policy's chat template; ``completions`` are decoded texts.

Keyword conventions (a source ignores the ones it does not use):
- per-sample columns: lists aligned with ``prompts``, e.g. ``references=[...]`` for exact match;
- ``input_ids`` (B, T), ``attention_mask`` (B, T), ``tokenizer``: the policy's full token sequences
  (prompt + completion, any padding layout) and the tokenizer that produced them. A source whose own
  tokenizer is the same may score these ids directly instead of re-tokenising the text.
"""

import numbers
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

Prompt = str | list[dict[str, str]]


@runtime_checkable
class RewardSource(Protocol):
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **kw: Any) -> torch.Tensor: ...


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: message lists become their contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(message["content"] for message in prompt)


def check_batch(prompts: Sequence[Prompt], completions: Sequence[str]) -> int:
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return len(prompts)


def as_rewards(values: Sequence[float], n: int, source: str) -> torch.Tensor:
    """Validate a list of n numbers and return it as a (n,) float32 tensor."""
    if len(values) != n:
        raise ValueError(f"{source} returned {len(values)} rewards for {n} completions")
    for i, value in enumerate(values):
        # bool is an int subclass; a True/False "reward" is almost always a bug on the other side
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{source} returned a non-numeric reward at index {i}: {value!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
