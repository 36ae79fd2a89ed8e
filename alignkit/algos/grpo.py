"""Critic-free online RL: GRPO, RLOO and REINFORCE++ in one loop, chosen once by ``--advantage``.

Each step: take ``prompts_per_step`` prompts, sample ``group_size`` responses each with the current policy, score
them, turn the scores into advantages, then take ``num_iterations`` passes of clipped policy-gradient updates
over the rollout (in minibatches of ``batch_size x grad_accum`` rows, one optimizer step each).

Advantages (``alignkit.losses``):
- grpo: Â_i = (r_i − mean_group r) / std_group r, the same for every token of response i; a group whose rewards
  are all equal gets exactly 0 (Shao et al. 2024, https://arxiv.org/abs/2402.03300, sec. 4.1.2).
- rloo: Â_i = R_i − mean_{j≠i} R_j, leave-one-out baseline (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).
- reinforce++: per-token returns G_t = r·[t = last] − β·Σ_{s≥t} (log π − log π_ref)_s, whitened over the whole
  batch (Hu 2025, https://arxiv.org/abs/2501.03262).

Where the KL to the reference goes (``--kl-in``, default ``auto``):
- loss (GRPO's choice): + β·k3 per token in the loss, k3 = π_ref/π − log(π_ref/π) − 1 (Shao et al., eq. 3-4).
  Its gradient is that of the *forward* KL(π_ref ‖ π) at the visited contexts, and group normalisation rescales
  the rewards per group, so the fixed point is near, not at, the reverse-KL optimum π* ∝ π_ref·exp(r/β).
- reward (RLOO's and REINFORCE++'s choice): the rewards become r − β·(log π − log π_ref) with the log-probs of
  the rollout (k1, detached): REINFORCE on that reward follows the gradient of E_π[r] − β·KL(π ‖ π_ref), whose
  optimum is exactly π* (tests/test_bandit.py checks this on an enumerable bandit).

Costs kept low: the reference is the base model with the LoRA adapter off (no copy), a frozen copy with full
fine-tuning, or nothing at all when β = 0; with one optimizer step per rollout (``num_iterations`` 1, one
minibatch) the "old" log-probs equal the current ones, so that extra forward pass is skipped (ρ = 1 in value,
and the gradient is the same); otherwise they are recomputed with the training forward before any update. Every
log-prob pass over a rollout takes padded or padding-free rows, whichever ``online.packed_rollout`` estimates
cheaper for those rows (``--packing``): responses that end well before the cap cost no padding.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignkit import losses
from alignkit.config import (
    DataConfig,
    ModelConfig,
    OptionError,
    above,
    arg,
    at_least,
    checked,
    model_location,
)
from alignkit.engine import Engine, TrainConfig, default_threads
from alignkit.generation import generator_arg
from alignkit.logprobs import LogprobModel
from alignkit.models import load_model
from alignkit.online import (
    RolloutConfig,
    ScoredRollout,
    batched_logprobs,
    check_minibatches,
    evaluate_policy,
    initial_copy,
    online_sampler,
    reference_logprobs,
    response_logprobs,
    rollout_loop,
    rows,
    run_prompts,
    with_policy_logprobs,
)
from alignkit.rewards import load_reward
from alignkit.rollout import Rollout

ADVANTAGES = ("grpo", "rloo", "reinforce++")
AGGREGATIONS = ("token-mean", "seq-mean", "seq-sum")


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data="bundled:movie_prompts_train",
                                                                eval_data="bundled:movie_prompts_test", max_length=256))
    # max_steps counts rollout steps here; batch_size x grad_accum rows make one optimizer step
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, batch_size=32, grad_accum=2, max_steps=100))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: str = arg("grpo", "grpo (group mean/std) | rloo (leave-one-out) | reinforce++ (batch-whitened returns)",
                         choices=ADVANTAGES)
    beta: float = arg(0.04, "β: weight of the KL to the reference; 0 drops the reference model", check=at_least(0))
    kl_in: str = arg("auto", "where β·KL goes: loss (k3) | reward (k1, detached) | auto (grpo: loss, else reward)",
                     choices=("auto", "loss", "reward"))
    clip_eps: float = arg(0.2, "ε of the clipped ratio π/π_old", check=above(0))
    num_iterations: int = arg(1, "passes (PPO epochs) over each rollout", check=at_least(1))
    loss_agg: str = arg("token-mean", "token-mean (DAPO) | seq-mean (GRPO paper) | seq-sum (plain REINFORCE)",
                        choices=AGGREGATIONS)
    reference: str = arg("", "reference model; empty: the initial policy", check=model_location)
    generator: str = generator_arg(online=True)
    packing: bool = arg(True, "padding-free log-prob passes (SDPA attention) for rollouts where they are estimated "
                              "cheaper (many responses ending well before the cap); --no-packing: padded rows always")

    def check(self) -> None:
        if self.advantage in ("grpo", "rloo") and self.rollout.group_size < 2:
            raise OptionError("group_size", self.rollout.group_size, f"--advantage {self.advantage} compares the responses "
                              "to one prompt: expected at least 2")
        check_minibatches(self.rollout.prompts_per_step, self.rollout.group_size, self.train.batch_size,
                          self.train.grad_accum)

    def kl_placement(self) -> str:
        if self.kl_in not in ("auto", "loss", "reward"):
            raise ValueError(f"--kl-in must be auto, loss or reward, got {self.kl_in!r}")
        if self.kl_in == "auto":
            return "loss" if self.advantage == "grpo" else "reward"
        return self.kl_in


@dataclass
class RLOOConfig(GRPOConfig):
    advantage: str = arg("rloo", "grpo (group mean/std) | rloo (leave-one-out) | reinforce++ (batch-whitened returns)",
                         choices=ADVANTAGES)


# ------------------------------------------------------------------------------------------------ advantages
AdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_advantage_fn(cfg: GRPOConfig, all_sum: losses.AllSum | None = None) -> AdvantageFn:
    """Chosen once: (scores (B,), token KL log π_old − log π_ref (B, T), mask (B, T)) -> advantages (B,) or (B, T).
    The token KL is all zeros when the KL is not in the reward. Groups live in one process (a prompt's samples
    are drawn together), so grpo/rloo are local; REINFORCE++ whitens over the global batch through `all_sum`
    (``Engine.all_sum``)."""
    group = cfg.rollout.group_size
    beta = cfg.beta if cfg.kl_placement() == "reward" else 0.0

    def penalised(scores, token_kl, mask):  # sequence reward r − β·log(π(y)/π_ref(y))
        return scores - beta * losses.masked_sum(token_kl, mask, dim=-1)

    if cfg.advantage == "grpo":
        return lambda s, kl, m: losses.group_normalized_advantages(penalised(s, kl, m), group)
    if cfg.advantage == "rloo":
        return lambda s, kl, m: losses.rloo_advantages(penalised(s, kl, m), group)
    if cfg.advantage == "reinforce++":

        def reinforce_pp(scores, token_kl, mask):
            rewards, _ = losses.kl_penalty_rewards(scores, token_kl, torch.zeros_like(token_kl), mask, beta)
            return losses.reinforce_pp_advantages(losses.discounted_returns(rewards, mask), mask, all_sum=all_sum)

        return reinforce_pp
    raise ValueError(f"--advantage must be one of {', '.join(ADVANTAGES)}, got {cfg.advantage!r}")


# ---------------------------------------------------------------------------------------------- the update
@dataclass
class Batch:
    """Rows of a rollout with everything the loss needs; response tensors (B, T), advantages (B,) or (B, T)."""

    rollout: Rollout
    advantages: torch.Tensor
    old_logps: torch.Tensor | None  # None: the policy has not moved since sampling, old = current (detached)
    ref_logps: torch.Tensor | None  # None: no KL term in the loss

    def to(self, device, non_blocking: bool = False) -> Batch:
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return Batch(self.rollout.to(device, non_blocking), *(move(x) for x in (self.advantages, self.old_logps,
                                                                               self.ref_logps)))


def select(rollout: Rollout, index: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor | None,
           ref: torch.Tensor | None) -> Batch:
    """The micro-batch of rows ``index``, per-token tensors cut to its longest response."""
    part = rows(rollout, index)
    width = part.response_ids.shape[1]

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else (x[index, :width] if x.dim() == 2 else x[index])

    return Batch(part, pick(advantages), pick(old), pick(ref))


def policy_loss(module, batch: Batch, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed clipped surrogate (+ β·k3 when the KL is in the loss) of a micro-batch; the engine divides by
    ``count_items`` over the minibatch, which gives token-mean, seq-mean or seq-sum aggregation."""
    mask = batch.rollout.response_mask
    logps = response_logprobs(module, batch.rollout, cfg.rollout.temperature, cfg.packing)  # (B, T)
    old = batch.old_logps if batch.old_logps is not None else logps.detach()
    if batch.ref_logps is not None:
        per_token, metrics = losses.grpo_policy_loss(logps, old, batch.ref_logps, batch.advantages, mask,
                                                     cfg.clip_eps, cfg.beta)
    else:
        per_token, metrics = losses.ppo_policy_loss(logps, old, batch.advantages, mask, cfg.clip_eps)
    if batch.ref_logps is not None:  # Σ_t log π/π_ref per response, from this very forward (see grpo_step)
        metrics["kl_seq"] = losses.masked_sum(logps.detach() - batch.ref_logps, mask, dim=-1).mean()
    if cfg.loss_agg == "seq-mean":
        total = losses.masked_mean(per_token, mask, dim=-1).sum()
    else:  # token-mean and seq-sum sum the tokens; they differ in the divisor (count_items)
        total = losses.masked_sum(per_token, mask)
    return total, {"loss": total.item() / count_items(batch, cfg), **{k: float(v) for k, v in metrics.items()}}


def count_items(batch: Batch, cfg: GRPOConfig) -> int:
    return int(batch.rollout.response_mask.sum()) if cfg.loss_agg == "token-mean" else batch.rollout.response_mask.shape[0]


def grpo_step(engine: Engine, reference: Callable[[Rollout], torch.Tensor] | None, rollout: Rollout,
              scores: torch.Tensor, cfg: GRPOConfig, advantage_fn: AdvantageFn) -> dict[str, float]:
    """The update for one scored rollout: advantages, then ``num_iterations`` passes of minibatch optimizer steps.

    ``reference(rollout) -> (B, T)`` gives reference log-probs (None when β = 0); ``scores`` (B,) can come from
    any source, e.g. a function of token ids in tests. Returns the step's metrics (means over optimizer steps).
    """
    mask = rollout.response_mask
    n_rows = mask.shape[0]
    minibatch = cfg.train.batch_size * cfg.train.grad_accum
    if n_rows % minibatch:
        raise ValueError(f"{n_rows} rollout rows per process do not split into minibatches of {minibatch} "
                         f"(batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum})")
    kl_in = cfg.kl_placement()
    ref_logps, ref_seconds = None, 0.0
    if reference is not None and cfg.beta > 0:
        started = time.time()
        with engine.autocast():
            ref_logps = reference(rollout)
        ref_seconds = time.time() - started
    several_updates = cfg.num_iterations * (n_rows // minibatch) > 1
    old_logps = None
    if several_updates or (kl_in == "reward" and ref_logps is not None):
        with engine.autocast():
            old_logps = batched_logprobs(engine.module, rollout, cfg.rollout.temperature, cfg.train.batch_size,
                                         packing=cfg.packing)
    token_kl = torch.zeros_like(rollout.logprobs)
    if kl_in == "reward" and ref_logps is not None:
        token_kl = torch.where(mask.bool(), old_logps - ref_logps, token_kl)
    advantages = advantage_fn(scores.float(), token_kl, mask)
    loss_ref = ref_logps if kl_in == "loss" else None
    # no recomputation when the policy cannot move before the update: old = current, detached
    loss_old = old_logps if several_updates else None

    def loss_fn(module, batch):
        return policy_loss(module, batch, cfg)

    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(cfg.num_iterations):
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.train.seed + engine.step)) \
            if several_updates else torch.arange(n_rows)
        for start in range(0, n_rows, minibatch):
            chosen = order[start : start + minibatch]
            micro = [select(rollout, chosen[k : k + cfg.train.batch_size], advantages, loss_old, loss_ref)
                     for k in range(0, minibatch, cfg.train.batch_size)]
            logs = engine.update(micro, loss_fn, lambda b: count_items(b, cfg))
            for name, value in logs.items():
                sums[name] = sums.get(name, 0.0) + value
            n_updates += 1
    metrics = {name: value / n_updates for name, value in sums.items()}
    if "kl" in metrics:  # the k3 term of the loss: per token, under the policy being updated
        metrics["kl_k3"] = metrics.pop("kl")
    kl_seq = metrics.pop("kl_seq", None)
    if ref_logps is not None:  # as in PPO and evaluation: Σ_t (log π_old − log π_ref) per response, mean over rows
        # π_old through the training forward, like π_ref: never the sampler's numbers (another kernel, maybe another
        # precision), so a policy equal to its reference shows exactly 0. Without a recomputed π_old, the single
        # update's own forward is π_old (its micro-batches are the reference's chunks, so the shapes match too).
        metrics["kl"] = float(losses.masked_sum(old_logps - ref_logps, mask, dim=-1).mean()) \
            if old_logps is not None else kl_seq
    metrics["entropy"] = float(-losses.masked_mean(rollout.logprobs, mask))  # −log π of the sampled tokens
    metrics["time/reference"] = ref_seconds
    return metrics


# ------------------------------------------------------------------------------------------------ training
@checked
def train(cfg: GRPOConfig) -> Path:
    default_threads()
    if cfg.loss_agg not in AGGREGATIONS:
        raise ValueError(f"--loss-agg must be one of {', '.join(AGGREGATIONS)}, got {cfg.loss_agg!r}")
    make_advantage_fn(cfg)  # checks --advantage before the model loads
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    prompts, eval_prompts = run_prompts(cfg.data, tokenizer, cfg.rollout.eval_prompts)
    reward = load_reward(cfg.rollout.reward)

    local_rows = check_minibatches(cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.train.batch_size,
                                   cfg.train.grad_accum)  # this process's rows per step
    updates_per_step = cfg.num_iterations * local_rows // (cfg.train.batch_size * cfg.train.grad_accum)
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else \
        max(1, math.ceil(cfg.train.epochs * len(prompts) / cfg.rollout.prompts_per_step))

    # the reference of full fine-tuning: a copy of the initial policy, taken before the engine can shard it
    initial = initial_copy(model, cfg.model.lora, cfg.reference) if cfg.beta else None
    engine = Engine(cfg.train, model, tokenizer, steps * updates_per_step, train_module=LogprobModel(model),
                    run_config={"algo": cfg.advantage, **asdict(cfg)})
    advantage_fn = make_advantage_fn(cfg, engine.all_sum)
    # before any update or resume, so the reference is the initial policy; none at all when β = 0
    reference = None if cfg.beta == 0 else reference_logprobs(
        model, cfg.model.lora, cfg.reference, cfg.rollout.temperature, cfg.train.batch_size, device=engine.device,
        engine=engine, initial=initial, packing=cfg.packing)
    sampling = cfg.rollout.sampling()
    sampler = online_sampler(cfg.generator, model, tokenizer, cfg.data.max_length + cfg.rollout.max_new_tokens,
                             cfg.train.seed)

    ref_pair = None if reference is None else \
        with_policy_logprobs(model, reference, cfg.rollout.temperature, cfg.train.batch_size, engine.autocast,
                             cfg.packing)

    def evaluate() -> dict[str, float]:
        with engine.gathered():  # under FSDP: the policy's whole weights for sampling and its KL pass
            return evaluate_policy(model, tokenizer, eval_prompts, reward, sampling, ref_pair, sampler=sampler)

    def update(scored: ScoredRollout) -> dict[str, float]:
        return grpo_step(engine, reference, scored.rollout, scored.rewards, cfg, advantage_fn)

    save = cfg.train.save_steps  # counted in rollout steps
    return rollout_loop(engine, prompts, steps, cfg.rollout.prompts_per_step, cfg.rollout.group_size,
                        updates_per_step, reward, sampling, sampler, update, evaluate if eval_prompts else None,
                        lambda done: bool(save) and done % save == 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: alignkit grpo --help")
