"""Pieces every online algorithm (PPO, GRPO, RLOO, REINFORCE++, RAFT, best-of-N) shares: prompt batches,
rollouts scored by any reward source, and the metrics that expose reward hacking (KL, entropy, distinct-n,
length) beside the reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alignkit.config import arg
from alignkit.data import PromptExample, prompt_example, read_examples
from alignkit.rewards import RewardModelSource, RewardSource
from alignkit.rollout import Rollout, SamplingConfig, sample


@dataclass
class RolloutConfig:
    """Sampling flags shared by the online algorithms."""

    reward: str = arg("vader", "reward source: vader, length:N, regex:PAT, exact, http://..., RM dir, module:function")
    prompts_per_step: int = arg(16, "prompts sampled per step")
    group_size: int = arg(4, "responses per prompt (GRPO/RLOO groups, RAFT/BoN candidates)")
    max_new_tokens: int = arg(32, "response length cap (EOS included)")
    temperature: float = arg(1.0, "sampling temperature (logits are divided by it in the loss too)")
    top_p: float = arg(1.0, "nucleus sampling mass; 1.0 = off")
    eval_prompts: int = arg(32, "held-out prompts scored before and after training (0: none)")

    def sampling(self, greedy: bool = False) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              greedy=greedy)


def read_prompts(source: str, tokenizer, max_length: int, skip_invalid: bool = False) -> list[PromptExample]:
    return read_examples(source, prompt_example, tokenizer, max_length, skip_invalid)


def prompt_batch(prompts: list[PromptExample], step: int, n: int, seed: int) -> list[PromptExample]:
    """The ``n`` prompts of ``step``: a fresh seeded permutation per pass over the prompts (resumable)."""
    per_epoch = max(1, len(prompts) // n)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [prompts[i] for i in order[index * n : (index + 1) * n]]


@dataclass
class ScoredRollout:
    """``group_size`` responses for each prompt, consecutive (rows g*k .. g*k+k-1 share prompt g)."""

    rollout: Rollout
    prompts: list[PromptExample]  # one per row
    texts: list[str]
    rewards: torch.Tensor  # (B,) fp32


def rollout_and_score(
    model,
    tokenizer,
    prompts: list[PromptExample],
    reward: RewardSource,
    sampling: SamplingConfig,
    group_size: int = 1,
    generator: torch.Generator | None = None,
) -> ScoredRollout:
    """Sample ``group_size`` responses per prompt with the current policy and score each one."""
    rows = [p for p in prompts for _ in range(group_size)]
    rollout = sample(model, [p.prompt_ids for p in rows], sampling, tokenizer=tokenizer, generator=generator)
    texts = tokenizer.batch_decode(rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    rewards = score(reward, rows, texts, rollout, tokenizer)
    return ScoredRollout(rollout, rows, texts, rewards)


def score(reward: RewardSource, rows: list[PromptExample], texts: list[str], rollout: Rollout, tokenizer) -> torch.Tensor:
    """Rewards (B,) for decoded responses; per-prompt columns (e.g. ``reference``) reach the source as lists,
    and a reward model with the policy's tokenizer reads the token ids directly."""
    columns: dict[str, Any] = {}
    for key in sorted({k for p in rows for k in p.extra}):
        columns[key + "s" if key == "reference" else key] = [p.extra.get(key) for p in rows]
    if isinstance(reward, RewardModelSource):
        columns.update(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, tokenizer=tokenizer)
    return reward([p.prompt for p in rows], texts, **columns).float()


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens (Li et al. 2016); falls as a policy collapses."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def rollout_metrics(scored: ScoredRollout, prefix: str = "") -> dict[str, float]:
    lengths = scored.rollout.response_mask.sum(-1).float()
    return {
        f"{prefix}reward/mean": float(scored.rewards.mean()),
        f"{prefix}reward/std": float(scored.rewards.std()) if scored.rewards.numel() > 1 else 0.0,
        f"{prefix}response/length": float(lengths.mean()),
        f"{prefix}response/no_eos": float((~scored.rollout.ended_with_eos).float().mean()),
        f"{prefix}distinct-2": distinct_n(scored.texts, 2),
    }


@torch.no_grad()
def evaluate_policy(model, tokenizer, prompts: list[PromptExample], reward: RewardSource, sampling: SamplingConfig,
                    ref_logps_fn=None, seed: int = 1234) -> dict[str, float]:
    """Mean reward, distinct-2, length (and KL to the reference when ``ref_logps_fn`` is given) of samples on
    held-out prompts, with a fixed sampling seed so before/after numbers are comparable."""
    scored = rollout_and_score(model, tokenizer, prompts, reward, sampling, 1, torch.Generator().manual_seed(seed))
    metrics = rollout_metrics(scored, prefix="eval/")
    if ref_logps_fn is not None:
        mask = scored.rollout.response_mask.bool()
        policy, ref = ref_logps_fn(scored.rollout)
        # sequence-level KL estimate E_pi[log pi - log pi_ref] over sampled responses
        metrics["eval/kl"] = float(((policy - ref) * mask).sum(-1).mean())
    return metrics


def response_logprobs(module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under ``module`` (a LogprobModel, possibly DDP-wrapped),
    logits divided by the sampling temperature; 0 on padding. Prompts are left-padded, so positions are
    counted from each row's first real token, as during sampling."""
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    start = rollout.prompt_ids.shape[1]
    target = torch.zeros_like(input_ids, dtype=torch.bool)
    target[:, start:] = rollout.response_mask.bool()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return module(input_ids, target, attention_mask, position_ids, temperature)[:, start:]
