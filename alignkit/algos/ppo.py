"""PPO for language models, the published RLHF recipe, top to bottom.

Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593), Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325),
Ouyang et al. 2022 (InstructGPT, https://arxiv.org/abs/2203.02155), and Huang et al. 2024, "The N Implementation
Details of RLHF with PPO" (https://arxiv.org/abs/2403.17031). One iteration:

1. rollout: ``prompts_per_step`` prompts x ``group_size`` (default 1) responses from the current policy, each
   scored by any reward source; a response that never produced EOS gets ``missing_eos_penalty``;
2. old log-probs, values and reference log-probs, recomputed with the training forward (logits / temperature);
   the reference is the initial policy: the same base with the LoRA adapter disabled, or a frozen copy;
3. per-token reward  R_t = −β·(log π(y_t) − log π_ref(y_t)) + [t = last]·score, optionally whitened;
4. GAE (γ = 1, λ = 0.95), advantages whitened over the batch;
5. ``ppo_epochs`` passes over the rollout in minibatches of ``batch_size x grad_accum`` rows, one optimizer step
   each, on  L = clipped policy loss + vf_coef·clipped value loss
   (+ ptx_coef·SFT loss for PPO-ptx), all token-means over the minibatch;
6. β follows the adaptive controller when ``target_kl`` > 0: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), n the
   samples of the rollout, horizon ``kl_horizon`` (10,000 as in OpenAI's code and TRL).

``max_steps`` and ``save_steps`` count PPO steps (rollouts); the learning-rate schedule, the logged ``step`` and
checkpoint names (checkpoint-N) count optimizer steps, as in ``alignkit.algos.grpo``.

The value head is a Linear(hidden, 1) on the policy's last hidden state, zero-initialised, trained jointly: one
backbone forward yields the log-probs and the values (``PolicyValueModel``). With ``--critic RM_DIR`` the values
come instead from a separate critic initialised from a reward model (its backbone and score head, as in
lm-human-preferences), which must share the policy's tokenizer; it is trained by the same optimizer. Dropout stays off (models load in
eval mode), so policy, old policy and reference log-probs are computed the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignkit import losses
from alignkit.config import (
    DataConfig,
    ModelConfig,
    OptionError,
    above,
    arg,
    at_least,
    between,
    checked,
    data_source,
    model_location,
)
from alignkit.data import IGNORE, pad_sft, read_examples, sft_example
from alignkit.engine import Engine, TrainConfig, default_threads
from alignkit.generation import generator_arg
from alignkit.logprobs import backbone_hidden, can_pack, logprobs_at, logprobs_from_hidden
from alignkit.models import load_model, scalar_head, unwrap
from alignkit.online import (
    RolloutConfig,
    ScoredRollout,
    by_row_chunks,
    check_minibatches,
    evaluate_policy,
    initial_copy,
    online_sampler,
    prompt_batch,
    reference_logprobs,
    rollout_forward,
    rollout_loop,
    run_prompts,
    with_policy_logprobs,
)
from alignkit.rewards import load_reward
from alignkit.rollout import Rollout


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class PPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(
        data="bundled:movie_prompts_train", eval_data="bundled:movie_prompts_test", max_length=128))
    # max_steps counts rollout steps here; batch_size x grad_accum rows make one optimizer step
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-5, batch_size=8, grad_accum=2,
                                                                   schedule="linear"))
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=1))
    kl_coef: float = arg(0.05, "β: weight of the per-token KL penalty in the reward (start value when adaptive)",
                         check=at_least(0))
    target_kl: float = arg(0.0, "adaptive β: target per-sequence KL (Ziegler 2019 used 6); 0 = fixed β", check=at_least(0))
    kl_horizon: int = arg(10000, "adaptive β: controller horizon; each rollout of n samples moves β by at most "
                                 "0.2·n/horizon (OpenAI's lm-human-preferences and TRL: 10000)", check=at_least(1))
    gamma: float = arg(1.0, "discount γ of the GAE", check=between(0, 1))
    lam: float = arg(0.95, "GAE λ", check=between(0, 1))
    ppo_epochs: int = arg(4, "passes over each rollout (one optimizer step per minibatch of batch_size x grad_accum)",
                          check=at_least(1))
    clip_ratio: float = arg(0.2, "ε: clip range of the probability ratio π/π_old", check=above(0))
    clip_value: float = arg(0.2, "clip range of the value update around the old values", check=above(0))
    vf_coef: float = arg(0.1, "weight of the value loss (lm-human-preferences: 0.1)", check=at_least(0))
    whiten_rewards: bool = arg(False, "scale the per-token rewards to unit variance over the batch (mean kept)")
    missing_eos_penalty: float = arg(0.0, "added to the score of a response without EOS (e.g. -1.0); 0 = off")
    missing_eos_replace: bool = arg(False, "replace such a score by missing_eos_penalty instead (lm-human-preferences)")
    ptx_coef: float = arg(0.0, "γ of PPO-ptx: weight of the SFT loss on ptx_data mixed into every update", check=at_least(0))
    ptx_data: str = arg("", "SFT records (prompt/completion, messages or text) for PPO-ptx", check=data_source)
    packing: bool = arg(True, "padding-free passes (SDPA attention) for rollouts where they are estimated cheaper "
                              "(many responses ending well before the cap); --no-packing: padded rows always")
    critic: str = arg("", "reward model dir to initialise a separate critic from; empty: a zero-init head on the policy",
                      check=model_location)
    generator: str = generator_arg(online=True)

    def check(self) -> None:
        if self.train.max_steps <= 0:
            raise OptionError("max_steps", self.train.max_steps, "PPO needs --max-steps > 0 (rollout steps)")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise OptionError("ptx_coef", self.ptx_coef, "needs --ptx-data (SFT records)")
        check_minibatches(self.rollout.prompts_per_step, self.rollout.group_size, self.train.batch_size,
                          self.train.grad_accum)


# ------------------------------------------------------------------------------------------ policy + value
class PolicyValueModel(nn.Module):
    """A causal LM and a scalar value head on its last hidden state; one backbone forward returns per-token
    log-probs, values and entropies. This is the module the engine trains (and DDP wraps). With a
    ``value_backbone`` (a separate critic) the head reads that backbone's hidden states instead."""

    def __init__(self, lm: nn.Module, value_head: nn.Module, value_backbone: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.value_backbone = value_backbone

    def forward(self, input_ids, target_mask, attention_mask=None, position_ids=None, temperature: float = 1.0,
                with_entropy: bool = False, at: tuple[torch.Tensor, torch.Tensor] | None = None,
                shared_prefix: int = 0):
        """(B, L) log-probs, values and entropies (None unless ``with_entropy``) at ``target_mask``; with ``at``
        (a padding-free layout, see ``alignkit.logprobs.token_logprobs``) (T,) each, at those tokens.
        ``shared_prefix``: consecutive rows with the same first columns run them once (``backbone_hidden``)."""
        inner = unwrap(self.lm)  # peft injects LoRA layers in place, so the base modules still use them
        hidden = backbone_hidden(inner.base_model, input_ids, attention_mask, position_ids, shared_prefix)  # (B, L, H)
        if at is not None:
            logps, entropy = logprobs_at(hidden, inner.get_output_embeddings(), input_ids, at, temperature, with_entropy)
        else:
            out = logprobs_from_hidden(hidden, inner.get_output_embeddings(), input_ids, target_mask, temperature,
                                       with_entropy)
            logps, entropy = out if with_entropy else (out, None)
        if self.value_backbone is not None:
            hidden = backbone_hidden(self.value_backbone, input_ids, attention_mask, position_ids,
                                     shared_prefix)  # (B, L, H_critic)
        if at is not None:  # V(x, y_<t) from the hidden state that predicts y_t
            values = scalar_head(self.value_head, hidden.flatten(0, 1)[at[1]]).squeeze(-1).float()
            return logps, values, entropy if with_entropy else None
        # V(x, y_<t) is read where y_t is predicted, at t − 1, like the log-prob of y_t
        v = scalar_head(self.value_head, hidden).squeeze(-1).float()  # (B, L)
        values = torch.where(target_mask.bool(), F.pad(v[:, :-1], (1, 0)), torch.zeros_like(v))
        return logps, values, entropy


def value_head_for(model: nn.Module) -> nn.Linear:
    """Linear(hidden, 1), zero-initialised: V = 0 at the start, so the first advantages are the returns."""
    head = nn.Linear(unwrap(model).config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def critic_from_reward_model(path: str, tokenizer) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(critic, its backbone, its score head) from a decoder reward model directory; the critic scores the
    policy's token ids, so both must use the same tokenizer."""
    from alignkit.algos.rm import is_decoder, load_reward_model
    from alignkit.rewards import tokenizer_fingerprint

    critic, critic_tokenizer = load_reward_model(path)
    if not is_decoder(critic):
        raise ValueError(f"--critic {path}: needs a decoder reward model (a score head at every position)")
    if tokenizer_fingerprint(critic_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"--critic {path}: its tokenizer differs from the policy's; it must read the same token ids")
    inner = unwrap(critic)
    return critic, getattr(inner, inner.base_model_prefix), inner.score


class KLController(nn.Module):
    """β as a buffer, so checkpoints save and restore it with the other extra modules."""

    def __init__(self, coef: float):
        super().__init__()
        self.register_buffer("coef", torch.tensor(float(coef), dtype=torch.float64))


# --------------------------------------------------------------------------------------------- rollout rows
def take(rollout: Rollout, index) -> Rollout:
    """The rollout restricted to rows ``index`` (a slice or an index tensor)."""
    return Rollout(**{f.name: getattr(rollout, f.name)[index] for f in fields(Rollout)})


def policy_outputs(module, rollout: Rollout, temperature: float, with_entropy: bool = False,
                   packing: bool = False) -> tuple:
    """(B, T) response log-probs, values and (with ``with_entropy``, else None) entropies under ``module``
    (a PolicyValueModel); 0 on padding.
    Prompts are left-padded, so positions count from each row's first real token, as during sampling.
    ``packing``: padding-free rows where ``online.packed_rollout`` estimates them cheaper (SDPA attention in the
    policy and the critic), chosen from the rows alone, as for the reference's pass."""
    critic = unwrap(module).value_backbone
    return rollout_forward(module, rollout, packing and (critic is None or can_pack(critic)), unwrap(module).lm,
                           temperature=temperature, with_entropy=with_entropy)


def final_scores(rewards: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float, replace_score: bool) -> torch.Tensor:
    """Scores after the missing-EOS penalty: r + penalty (or penalty alone with ``replace_score``) where no EOS
    was produced, r elsewhere. Huang et al. 2024, detail "penalise responses that do not end with EOS"."""
    if penalty == 0.0 and not replace_score:
        return rewards
    penalised = torch.full_like(rewards, penalty) if replace_score else rewards + penalty
    return torch.where(ended_with_eos.to(rewards.device), rewards, penalised)


# -------------------------------------------------------------------------------------------------- update
def ppo_loss(module, batch: dict, cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed (over response tokens) clipped policy loss + vf_coef·clipped value loss, plus PPO-ptx."""
    mask = batch["rollout"].response_mask
    logps, values, _ = policy_outputs(module, batch["rollout"], cfg.rollout.temperature, packing=cfg.packing)
    pg, pg_metrics = losses.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cfg.clip_ratio)
    vf, vf_metrics = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.clip_value)
    loss = losses.masked_sum(pg + cfg.vf_coef * vf, mask)
    n = max(1, int(mask.sum()))
    metrics = {"policy_loss": float(losses.masked_sum(pg.detach(), mask)) / n,
               "value_loss": float(losses.masked_sum(vf.detach(), mask)) / n,
               **{k: float(v) for k, v in {**pg_metrics, **vf_metrics}.items()}}
    if batch.get("ptx") is not None:
        sft = batch["ptx"]
        target = sft["labels"] != IGNORE
        target[:, 0] = False
        sft_logps = module(sft["input_ids"], target, sft["attention_mask"])[0]
        nll = -(sft_logps * target).sum()
        # ptx_scale turns the summed NLL into ptx_coef x its token mean, on the engine's per-response-token scale
        loss = loss + batch["ptx_scale"] * nll
        metrics["ptx_loss"] = float(nll.detach()) / max(1, int(target.sum()))
    return loss, metrics


def ppo_update(engine: Engine, module: nn.Module, ref_fn: Callable[[Rollout], torch.Tensor], rollout: Rollout,
               scores: torch.Tensor, cfg: PPOConfig, kl_coef: float, ptx_batches: list | None = None) -> dict[str, float]:
    """One PPO iteration on a scored rollout: rewards with the KL penalty, GAE, then ``ppo_epochs`` passes in
    minibatches of batch_size x grad_accum rows, one optimizer step each. ``scores`` (B,) can come from any
    source (a function of token ids in tests). ``ptx_batches``: one list of SFT examples per optimizer step
    (PPO-ptx). Returns the metrics, means over the optimizer steps."""
    mask = rollout.response_mask
    B, fwd = mask.shape[0], cfg.train.batch_size
    minibatch = cfg.train.batch_size * cfg.train.grad_accum
    if B % minibatch:
        raise ValueError(f"{B} rollout rows per process do not split into minibatches of {minibatch} "
                         f"(batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum})")
    # "old" log-probs and values from the training forward, not the sampler: the ratio starts at exactly 1
    # in the reference's chunks (online.by_row_chunks), so the old policy's pass runs the same shapes
    old_logps, old_values, entropy = by_row_chunks(
        lambda part: policy_outputs(module, part, cfg.rollout.temperature, True, cfg.packing), rollout, fwd,
        engine.autocast)
    started = time.time()
    ref_logps = ref_fn(rollout)
    ref_seconds = time.time() - started
    rewards, kl_metrics = losses.kl_penalty_rewards(scores, old_logps, ref_logps, mask, kl_coef)
    # whitening statistics are those of the global batch (all processes' rollouts), as in one process
    if cfg.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False, all_sum=engine.all_sum)
    advantages, returns = losses.gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = losses.masked_whiten(advantages, mask, all_sum=engine.all_sum)

    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + engine.step)
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, minibatch):
            chosen = order[start : start + minibatch]
            batches = [{"rollout": take(rollout, r), "old_logps": old_logps[r], "old_values": old_values[r],
                        "advantages": advantages[r], "returns": returns[r]}
                       for r in (chosen[k : k + fwd] for k in range(0, minibatch, fwd))]
            if ptx_batches:
                _attach_ptx(batches, ptx_batches[n_updates % len(ptx_batches)], cfg, engine.tokenizer.pad_token_id)
            logs = engine.update(batches, lambda m, b: ppo_loss(m, b, cfg), lambda b: int(b["rollout"].response_mask.sum()))
            for name, value in logs.items():
                sums[name] = sums.get(name, 0.0) + value
            n_updates += 1
    metrics = {name: value / n_updates for name, value in sums.items()}
    metrics.update({
        "kl": float(kl_metrics["kl"]), "kl_coef": kl_coef, "non_score_reward": float(kl_metrics["kl_penalty"]),
        "score/mean": float(scores.mean()), "entropy": float(losses.masked_mean(entropy, mask)),
        "values/mean": float(losses.masked_mean(old_values, mask)), "returns/mean": float(losses.masked_mean(returns, mask)),
        "time/reference": ref_seconds,
    })
    return metrics


def _attach_ptx(batches: list[dict], examples: list, cfg: PPOConfig, pad_id: int) -> None:
    """Spread the step's SFT examples over its micro-batches; the engine divides the summed loss by the
    minibatch's response tokens, so the SFT sum is rescaled to ptx_coef x its own token mean."""
    n_response = sum(int(b["rollout"].response_mask.sum()) for b in batches)
    n_sft = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    per = math.ceil(len(examples) / len(batches))
    for i, b in enumerate(batches):
        part = examples[i * per : (i + 1) * per]
        b["ptx"] = pad_sft(part, pad_id) if part else None
        b["ptx_scale"] = cfg.ptx_coef * n_response / max(1, n_sft)


# ---------------------------------------------------------------------------------------------------- train
@checked
def train(cfg: PPOConfig) -> Path:
    default_threads()
    if cfg.train.max_steps <= 0:
        raise ValueError("PPO needs --max-steps > 0 (rollout steps)")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ValueError("--ptx-coef needs --ptx-data (SFT records)")
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    prompts, eval_prompts = run_prompts(cfg.data, tokenizer, cfg.rollout.eval_prompts)
    ptx = read_examples(cfg.ptx_data, sft_example, tokenizer, cfg.data.max_length, cfg.data.skip_invalid) \
        if cfg.ptx_coef > 0 else []
    reward = load_reward(cfg.rollout.reward)

    local_rows = check_minibatches(cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.train.batch_size,
                                   cfg.train.grad_accum)  # this process's rows per step
    minibatch = cfg.train.batch_size * cfg.train.grad_accum
    updates_per_step = cfg.ppo_epochs * local_rows // minibatch
    steps = cfg.train.max_steps

    if cfg.critic:
        critic, value_backbone, value_head = critic_from_reward_model(cfg.critic, tokenizer)
        value_modules = {"critic": critic}
    else:
        value_backbone, value_head = None, value_head_for(model)
        value_modules = {"value_head": value_head}
    module = PolicyValueModel(model, value_head, value_backbone).eval()  # dropout off throughout
    kl_ctl = KLController(cfg.kl_coef)
    initial = initial_copy(model, cfg.model.lora)  # before the engine can shard the policy
    engine = Engine(cfg.train, model, tokenizer, steps * updates_per_step, train_module=module,
                    extra_modules={**value_modules, "kl_controller": kl_ctl}, run_config={"algo": "ppo", **asdict(cfg)})
    # before any update or resume: the reference is the initial policy
    ref_fn = reference_logprobs(model, cfg.model.lora, "", cfg.rollout.temperature, cfg.train.batch_size, engine.autocast,
                                engine=engine, initial=initial, packing=cfg.packing)
    sampling = cfg.rollout.sampling()
    sampler = online_sampler(cfg.generator, model, tokenizer, cfg.data.max_length + cfg.rollout.max_new_tokens,
                             cfg.train.seed)

    ref_pair = with_policy_logprobs(model, ref_fn, cfg.rollout.temperature, cfg.train.batch_size, engine.autocast,
                                    cfg.packing)

    def evaluate() -> dict[str, float]:
        with engine.gathered():  # under FSDP: the policy's whole weights for sampling and its KL pass
            return evaluate_policy(model, tokenizer, eval_prompts, reward, sampling, ref_pair, sampler=sampler)

    def update(scored: ScoredRollout) -> dict[str, float]:
        scores = final_scores(scored.rewards, scored.rollout.ended_with_eos, cfg.missing_eos_penalty,
                              cfg.missing_eos_replace)
        # 2-5. rewards with the KL penalty, GAE, the PPO epochs (with PPO-ptx batches when asked)
        first = engine.step  # the optimizer steps this rollout's update starts from
        ptx_batches = [prompt_batch(ptx, first + u, minibatch, cfg.train.seed + 1)
                       for u in range(updates_per_step)] if ptx else None
        logs = ppo_update(engine, engine.module, ref_fn, scored.rollout, scores, cfg, float(kl_ctl.coef), ptx_batches)
        # 6. adaptive β from this rollout's KL
        if cfg.target_kl > 0:  # every process must take the same β: average the KL over processes
            kl = torch.tensor(logs["kl"], device=engine.device)
            kl = engine.accelerator.reduce(kl, reduction="mean") if engine.world_size > 1 else kl
            # K_β = n_steps / horizon, n_steps = samples in this rollout over all processes (Ziegler et al. 2019)
            n_samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
            kl_ctl.coef.fill_(losses.adaptive_kl_coef(float(kl_ctl.coef), float(kl), cfg.target_kl,
                                                      k_beta=n_samples / cfg.kl_horizon))
        return logs

    # 1. each step's rollout (sampled and scored by the loop), then the update above
    save = cfg.train.save_steps  # counted in PPO steps (rollouts)
    return rollout_loop(engine, prompts, steps, cfg.rollout.prompts_per_step, cfg.rollout.group_size,
                        updates_per_step, reward, sampling, sampler, update, evaluate if eval_prompts else None,
                        lambda done: bool(save) and done % save == 0)


__all__ = ["KLController", "PPOConfig", "PolicyValueModel", "critic_from_reward_model", "final_scores", "policy_outputs", "ppo_loss",
           "ppo_update", "train", "value_head_for"]
