"""RAFT: Reward rAnked FineTuning (Dong et al. 2023, https://arxiv.org/abs/2304.06767, Algorithm 1).

Each stage:
1. sample b prompts (``--prompts-per-step``) and K responses each (``--group-size``, the paper uses K = 8..32)
   from the current policy at temperature λ (``--temperature``);
2. keep, per prompt, the response with the highest ranking score
       s(x, y) = r(x, y) − β · log(π(y|x) / π_0(y|x))
   (β = ``--kl-beta``, 0 by default: plain reward ranking; the paper's KL-regularised variant, section 3.2),
   where log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response tokens and π_0 is the initial policy;
3. fine-tune on the kept (prompt, response) pairs with the SFT loss (``sft_epochs`` passes), then repeat.

The reference π_0 is the LoRA base with the adapter disabled (``--lora``), else a frozen copy of the initial
weights. Its log-probs also give the per-stage ``kl`` metric: the sequence-level estimate
E_y[Σ_t log π(y_t|·) − log π_0(y_t|·)] over the stage's samples, with logits divided by λ for both models as in
the other online trainers. Reward alone hides collapse (LMFlow's RAFT lost half its distinct-2 while the reward
rose), so distinct-2, response length and KL are logged beside it.

One engine runs the whole job: total optimizer steps = stages × steps per stage, steps per stage =
sft_epochs × ceil(kept samples per process / (batch_size × grad_accum)); ``--max-steps``/``--epochs`` are not
used. Checkpoints are written only at stage boundaries (at the end of a stage in which a multiple of
``--save-steps`` was passed), and a resumed run restarts at the next stage with the same seeded prompts and
samples, so it reproduces the uninterrupted run. ``--eval-steps N`` evaluates on the held-out prompts after every
N stages. The outer loop (sampling, logging, evaluation, checkpoints) is the one PPO and GRPO share
(``online.rollout_loop``); a stage is its step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignkit.algos.sft import count_targets, sft_loss
from alignkit.config import DataConfig, ModelConfig, arg, at_least, checked, need_data
from alignkit.data import IGNORE, SFTExample
from alignkit.data.collate import pad_sft
from alignkit.engine import Engine, TrainConfig, default_threads, distributed_state
from alignkit.generation import generator_arg
from alignkit.logprobs import LogprobModel
from alignkit.models import load_model
from alignkit.online import (
    RolloutConfig,
    ScoredRollout,
    distinct_n,
    evaluate_policy,
    initial_copy,
    mean_across_processes,
    online_sampler,
    reference_logprobs,
    rollout_loop,
    run_prompts,
    with_policy_logprobs,
)
from alignkit.rewards import load_reward


@dataclass
class RAFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=8))
    stages: int = arg(10, "RAFT stages: sample, keep the best per prompt, fine-tune", check=at_least(1))
    sft_epochs: int = arg(1, "passes over each stage's kept samples", check=at_least(1))
    kl_beta: float = arg(0.0, "rank by reward - kl_beta * log(pi/pi_ref) of the whole response; 0: reward only",
                         check=at_least(0))
    generator: str = generator_arg(online=True)

    def check(self) -> None:
        need_data(self.data)


# ----------------------------------------------------------------------------------------------- selection


def ranking_scores(rewards: torch.Tensor, log_ratio: torch.Tensor, kl_beta: float) -> torch.Tensor:
    """s = r − β · log(π(y|x)/π_0(y|x)), (B,): RAFT's KL-regularised ranking (Dong et al. 2023, section 3.2).
    ``log_ratio`` is the sequence log-ratio, summed over response tokens."""
    return rewards if kl_beta == 0 else rewards - kl_beta * log_ratio


def select_best(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row index of the highest score in each group of ``group_size`` consecutive rows: (B,) -> (B / K,).
    Ties go to the first sample."""
    groups = scores.view(-1, group_size)  # (G, K)
    return groups.argmax(-1) + torch.arange(groups.shape[0]) * group_size


def kept_examples(scored: ScoredRollout, rows: torch.Tensor) -> list[SFTExample]:
    """SFT examples (prompt + response, loss on the response only) for the chosen rollout rows."""
    rollout = scored.rollout
    out = []
    for row in rows.tolist():
        prompt_ids = scored.prompts[row].prompt_ids
        response_ids = rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()
        out.append(SFTExample(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, "raft"))
    return out


# ------------------------------------------------------------------------------------------------ train


@checked
def train(cfg: RAFTConfig) -> Path:
    default_threads()
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    reward = load_reward(cfg.rollout.reward)
    prompts, eval_prompts = run_prompts(cfg.data, tokenizer, cfg.rollout.eval_prompts)

    world = distributed_state().num_processes
    per_stage = min(cfg.rollout.prompts_per_step, len(prompts))
    if per_stage % world:
        raise ValueError(f"prompts per stage ({per_stage}) must be divisible by the {world} processes")
    local = per_stage // world  # kept samples per process and stage
    steps_per_epoch = math.ceil(local / cfg.train.world_batch)
    steps_per_stage = cfg.sft_epochs * steps_per_epoch
    total = cfg.stages * steps_per_stage
    initial = initial_copy(model, cfg.model.lora)  # before the engine can shard the policy
    engine = Engine(cfg.train, model, tokenizer, total, train_module=LogprobModel(model),
                    run_config={"algo": "raft", **asdict(cfg)})
    sampling = cfg.rollout.sampling()
    sampler = online_sampler(cfg.generator, model, tokenizer, cfg.data.max_length + cfg.rollout.max_new_tokens,
                             cfg.train.seed)
    k = cfg.rollout.group_size
    # π_0 = the initial policy, fixed before resume() can load trained weights; the same precision as the policy's
    # side of every KL (engine.autocast), so the stage-1 KL of an untrained policy is exactly 0
    reference = reference_logprobs(model, cfg.model.lora, "", cfg.rollout.temperature, cfg.train.batch_size,
                                   engine.autocast, device=engine.device, engine=engine, initial=initial, packing=True)
    logps_fn = with_policy_logprobs(model, reference, cfg.rollout.temperature, cfg.train.batch_size, engine.autocast,
                                    packing=True)  # KL passes: padding-free rows where cheaper, both sides alike

    def evaluate() -> dict[str, float]:
        with engine.gathered():  # under FSDP: the policy's whole weights for sampling and its KL pass
            return evaluate_policy(model, tokenizer, eval_prompts, reward, sampling, logps_fn,
                                   seed=cfg.train.seed + 1234, sampler=sampler)

    def stage(scored: ScoredRollout) -> dict[str, float]:
        # 1. (the loop) K responses sampled for this process's share of the stage's prompts, scored
        index = engine.step // steps_per_stage
        with engine.gathered():  # under FSDP: the policy's whole weights for the KL pass
            policy, ref = logps_fn(scored.rollout)
        mask = scored.rollout.response_mask.float()
        log_ratio = ((policy - ref) * mask).sum(-1)  # (B,) sequence-level log π/π_0

        # 2. keep the best response per prompt
        rows = select_best(ranking_scores(scored.rewards, log_ratio, cfg.kl_beta), k)
        kept = kept_examples(scored, rows)
        stage_metrics = {
            "reward/kept": float(scored.rewards[rows].mean()),
            "kl": float(log_ratio.mean()),
            "kept/kl": float(log_ratio[rows].mean()),
            "kept/distinct-2": distinct_n([scored.texts[r] for r in rows.tolist()], 2),
            "kept/response/length": float(mask[rows].sum(-1).mean()),
        }
        stage_metrics = {**mean_across_processes(engine, stage_metrics), "stage": index + 1}

        # 3. SFT on the kept samples; every optimizer step but the last is logged here, the last by the loop
        for epoch in range(cfg.sft_epochs):
            shuffle = torch.Generator().manual_seed(cfg.train.seed + 7919 * index + epoch)
            order = torch.randperm(len(kept), generator=shuffle).tolist()
            for s in range(steps_per_epoch):
                chosen = [kept[i] for i in order[s * cfg.train.world_batch : (s + 1) * cfg.train.world_batch]]
                micro = [pad_sft(chosen[j : j + cfg.train.batch_size], tokenizer.pad_token_id)
                         for j in range(0, len(chosen), cfg.train.batch_size)]
                logs = engine.update(micro, sft_loss, count_targets)
                if epoch < cfg.sft_epochs - 1 or s < steps_per_epoch - 1:
                    engine.log(logs)
        if engine.is_main and not cfg.train.progress:
            print(f"stage {index + 1}/{cfg.stages}: reward {float(scored.rewards.mean()):.4f} "
                  f"kept {stage_metrics['reward/kept']:.4f} kl {stage_metrics['kl']:.4f}")
        return {**logs, **stage_metrics}

    def checkpoint_after(stages_done: int) -> bool:  # a multiple of --save-steps passed during that stage
        save, done = cfg.train.save_steps, stages_done * steps_per_stage
        return bool(save) and done // save > (done - steps_per_stage) // save

    return rollout_loop(engine, prompts, cfg.stages, per_stage, k, steps_per_stage, reward, sampling, sampler, stage,
                        evaluate if eval_prompts else None, checkpoint_after)
