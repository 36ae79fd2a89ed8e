"""The GRPO/RLOO/REINFORCE++ trainer end to end on a tiny model: it learns a task with a known answer, a group of
equal rewards moves nothing, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alignkit.algos.grpo import GRPOConfig, RLOOConfig, grpo_step, make_advantage_fn, train
from alignkit.cli import add_config_flags, build_config
from alignkit.config import DataConfig, ModelConfig
from alignkit.engine import Engine, TrainConfig
from alignkit.logprobs import LogprobModel
from alignkit.models import load_model
from alignkit.online import RolloutConfig, batched_logprobs
from alignkit.rollout import SamplingConfig, sample

WORDS = [" great", " bad", " movie", " the", " and", " film", " boring", " plot"]


def great_fraction(completion: str) -> float:
    """The reward of the learning test: share of the words that are "great" (1.0 at the optimum)."""
    words = completion.split()
    return sum(w == "great" for w in words) / max(1, len(words))


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama (SmolLM2 vocabulary), rewired so that it samples mostly one of 8 words: a random-init model
    spreads its mass over 49k tokens and a few RL steps could not find any rewarded one.

    Every input embedding carries 3.0 in dimension 0, so after the final RMSNorm that dimension is about
    +sqrt(hidden) at every position; the untied LM head reads only it, with weight 1.3 for the 8 words and 0
    elsewhere: logits ≈ 10 for the words, ≈ 0 for the others, so ~84% of the mass is on the 8 words."""
    _, tokenizer = load_model(str(tiny_model_dir))
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in WORDS]
    assert len(set(ids)) == len(WORDS) and all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in WORDS)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids, 0] = 1.3
    path = tmp_path_factory.mktemp("peaked-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    train_rows = [{"prompt": f"Review number {i}:"} for i in range(16)]
    test_rows = [{"prompt": f"Held-out review {i}:"} for i in range(8)]
    return write_jsonl(root / "train.jsonl", train_rows), write_jsonl(root / "test.jsonl", test_rows)


def config(model_dir: Path, prompts: tuple[Path, Path], out: Path, **overrides) -> GRPOConfig:
    train_fields = {"output_dir": str(out), "lr": 7e-3, "batch_size": 16, "grad_accum": 2, "max_steps": 7,
                    "schedule": "constant", "report_to": "none", "progress": False, "seed": 0}
    train_fields.update(overrides.pop("train", {}))
    rollout_fields = {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 6}
    rollout_fields.update(overrides.pop("rollout", {}))
    return GRPOConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(data=str(prompts[0]), eval_data=str(prompts[1]), max_length=64),
        train=TrainConfig(**train_fields),
        rollout=RolloutConfig(reward="test_grpo:great_fraction", eval_prompts=8, **rollout_fields),
        **overrides,
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trainer_learns_the_rewarded_word(peaked_model_dir, prompt_files, tmp_path):
    """Initially ~1/8 x 84% ≈ 0.1 of the words are "great"; the optimum is 1.0. Seven steps of 32 samples must
    lift the held-out reward (fixed sampling seed, before vs after) well above where it started (measured with
    two seeds and three learning rates: 0.15 -> 0.29-0.37).
    (RLOO and REINFORCE++ share this loop; tests/test_bandit.py checks what each converges to.)"""
    out = tmp_path / "grpo"
    train(config(peaked_model_dir, prompt_files, out))
    rows = metrics(out)
    before, after = rows[0]["eval/reward/mean"], rows[-1]["eval/reward/mean"]
    assert before < 0.2
    assert after > before + 0.15
    steps = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(steps) == 7 and sum(steps[-2:]) / 2 > sum(steps[:2]) / 2 + 0.05
    last = [r for r in rows if "reward/mean" in r][-1]
    assert {"kl", "entropy", "clipfrac", "response/length", "distinct-2", "reward/std"} <= last.keys()
    assert last["kl"] > 0 and last["response/length"] == 6  # the peaked model never samples EOS
    # the step's wall time split: the reward's part of the rollout, the reference's part of the update
    assert 0 < last["time/reward"] < last["time/rollout"] and 0 < last["time/reference"] < last["time/update"]
    assert (out / "final" / "model.safetensors").exists()


def _tiny_engine(model_dir: Path, out: Path, beta: float):
    model, _ = load_model(str(model_dir))
    cfg = GRPOConfig(train=TrainConfig(output_dir=str(out), lr=1e-2, batch_size=8, grad_accum=1, report_to="none",
                                       progress=False), rollout=RolloutConfig(prompts_per_step=2, group_size=4,
                                                                              max_new_tokens=4), beta=beta)
    ref = LogprobModel(load_model(str(model_dir))[0])
    engine = Engine(cfg.train, model, None, 10, train_module=LogprobModel(model))
    rollout = sample(model, [[1, 2, 3]] * 4 + [[4, 5]] * 4, SamplingConfig(max_new_tokens=4),
                     generator=torch.Generator().manual_seed(0))
    return cfg, model, engine, lambda r: batched_logprobs(ref, r, 1.0, 8, packing=cfg.packing), rollout


def test_equal_reward_groups_give_zero_gradient(tiny_model_dir, tmp_path):
    """Equal rewards in every group -> advantages exactly 0; the policy equals the reference, where the k3 term
    has zero gradient too; so Adam's first step (update ∝ m̂ = 0) leaves every weight bit-for-bit unchanged.
    The control with distinct rewards in one group must move the weights."""
    cfg, model, engine, reference, rollout = _tiny_engine(tiny_model_dir, tmp_path / "flat", beta=0.04)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = grpo_step(engine, reference, rollout, torch.tensor([1.0] * 4 + [-2.0] * 4), cfg, make_advantage_fn(cfg))
    assert logs["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    cfg, model, engine, reference, rollout = _tiny_engine(tiny_model_dir, tmp_path / "control", beta=0.04)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grpo_step(engine, reference, rollout, torch.tensor([1.0, 0.0, 1.0, 0.0] + [-2.0] * 4), cfg, make_advantage_fn(cfg))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_equals_uninterrupted_run(peaked_model_dir, prompt_files, tmp_path):
    """4 steps straight vs 2 steps, checkpoint, resume for 2 more (prompt order and sampling seeds are indexed by
    step; Adam state and RNG are restored): the final weights must be identical. Two optimizer steps per
    rollout (minibatches of 8 out of 16 rows) and old log-probs recomputed, so that path is covered too."""
    overrides = {"train": {"max_steps": 4, "save_steps": 2, "batch_size": 8, "grad_accum": 1},
                 "rollout": {"prompts_per_step": 4, "max_new_tokens": 4}, "advantage": "reinforce++"}
    straight = tmp_path / "straight"
    train(config(peaked_model_dir, prompt_files, straight, **overrides))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # checkpoints are named by optimizer step: rollout step 2 = optimizer step 4
    (straight / "checkpoint-4").rename(resumed / "checkpoint-4")
    overrides["train"]["resume"] = True
    train(config(peaked_model_dir, prompt_files, resumed, **overrides))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics(resumed) if "reward/mean" in r]
    assert steps == [6, 8]  # two optimizer steps per rollout step


def test_config_flags_and_rloo_default():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, GRPOConfig)  # raises if two nested configs share a field name
    flags = {k: v for k, v in vars(parser.parse_args(["--advantage", "reinforce++", "--group-size", "8",
                                                      "--kl-in", "loss"])).items()}
    cfg = build_config(GRPOConfig, flags)
    assert (cfg.advantage, cfg.rollout.group_size, cfg.kl_placement()) == ("reinforce++", 8, "loss")
    assert RLOOConfig().advantage == "rloo" and RLOOConfig().kl_placement() == "reward"
    assert GRPOConfig().kl_placement() == "loss"
    with pytest.raises(ValueError, match="--advantage"):
        make_advantage_fn(GRPOConfig(advantage="ppo"))
