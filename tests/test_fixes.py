"""Smaller fixes of issue #8, item 9, each against hand-computed values: KTO's per-class metrics are means over
the whole step; DPO's β defaults per loss (SimPO 2.0); PPO's adaptive KL controller moves β by n/horizon."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from test_ppo import _config as ppo_config

from alignkit.algos import dpo, kto, ppo
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import Record, unpaired_example
from alignkit.engine import TrainConfig
from alignkit.models import load_model, tiny_causal_lm


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _completion_logp(model, example) -> float:
    """Σ log p(completion token | everything before it), by a plain forward and log_softmax."""
    ids = torch.tensor([example.prompt_ids + example.completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(example.prompt_ids) - 1 :].sum())


def test_kto_class_metrics_are_means_over_the_step(tiny_model_dir, tmp_path):
    """3 desirable + 1 undesirable example, one step of 2 micro-batches of 2: one micro-batch has no undesirable
    example. The logged class means must be those over the step's examples (a mean of micro-batch means would
    average a 0 in for the micro-batch without an undesirable example)."""
    ref_model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=64, seed=1)
    ref_dir = tmp_path / "ref"
    ref_model.save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    rows = [{"prompt": "Film A:", "completion": " great", "label": True},
            {"prompt": "Film B:", "completion": " lovely and warm", "label": True},
            {"prompt": "Film C:", "completion": " fine", "label": True},
            {"prompt": "Film D:", "completion": " dull and long", "label": False}]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    run = tmp_path / "run"
    beta = 0.1
    kto.train(kto.KTOConfig(
        model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=str(data), max_length=64),
        train=TrainConfig(output_dir=str(run), max_steps=1, batch_size=2, grad_accum=2, lr=1e-6, mixed_precision="no",
                          report_to="none", progress=False),
        beta=beta, reference=str(ref_dir)))
    logged = next(r for r in _metrics(run) if r["step"] == 1 and "logps/chosen" in r)

    policy = load_model(str(tiny_model_dir))[0]
    examples = [unpaired_example(Record(r, f"kto.jsonl:{i + 1}"), tokenizer, None) for i, r in enumerate(rows)]
    logp = [_completion_logp(policy, e) for e in examples]
    ref = [_completion_logp(ref_model, e) for e in examples]
    chosen_logps = sum(logp[:3]) / 3
    chosen_rewards = beta * sum(p - r for p, r in zip(logp[:3], ref[:3])) / 3
    rejected_rewards = beta * (logp[3] - ref[3])
    assert logged["logps/chosen"] == pytest.approx(chosen_logps, rel=1e-4)
    assert logged["logps/rejected"] == pytest.approx(logp[3], rel=1e-4)
    assert logged["rewards/chosen"] == pytest.approx(chosen_rewards, rel=1e-3, abs=1e-5)
    assert logged["rewards/rejected"] == pytest.approx(rejected_rewards, rel=1e-3, abs=1e-5)
    assert logged["rewards/margins"] == pytest.approx(chosen_rewards - rejected_rewards, rel=1e-3, abs=1e-5)


def test_dpo_beta_defaults_per_loss(tiny_model_dir, tmp_path, capsys):
    assert dpo.DPOConfig(loss="sigmoid").loss_beta() == 0.1
    assert dpo.DPOConfig(loss="ipo").loss_beta() == 0.1
    assert dpo.DPOConfig(loss="simpo").loss_beta() == 2.0  # SimPO paper/repository default
    assert dpo.DPOConfig(loss="simpo", beta=2.5).loss_beta() == 2.5  # a given --beta wins
    # SimPO with the default: chosen / rejected average log-probs -1 and -2, γ 0.5:
    # z = 2.0·(−1) − 2.0·(−2) − 0.5 = 1.5, loss = log(1 + e^−1.5)
    pairs = dpo.PairLogps(torch.tensor([-3.0]), torch.tensor([-8.0]), torch.tensor([3.0]), torch.tensor([4.0]))
    loss, _ = dpo.make_objective(dpo.DPOConfig(loss="simpo"))(pairs)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    # DPO with the default β 0.1: policy margin 1, reference margin 0 -> log(1 + e^−0.1)
    pairs = dpo.PairLogps(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([1.0]), torch.tensor([1.0]),
                          torch.tensor([-3.0]), torch.tensor([-3.0]))
    loss, _ = dpo.make_objective(dpo.DPOConfig())(pairs)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.1)), rel=1e-6)

    # the run prints the β it uses and records it
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(2)])
    run = tmp_path / "run"
    dpo.train(dpo.DPOConfig(model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=str(data), max_length=32),
                            train=TrainConfig(output_dir=str(run), max_steps=1, batch_size=2, mixed_precision="no",
                                              report_to="none", progress=False), loss="simpo"))
    assert "dpo: --loss simpo, beta 2 (the loss's default; set --beta to change)" in capsys.readouterr().out
    assert json.loads((run / "final" / "alignkit_config.json").read_text())["beta"] == 2.0


def test_ppo_adaptive_kl_moves_by_samples_over_horizon(tiny_model_dir, tmp_path, monkeypatch):
    """First rollout: old policy == reference, so KL = 0 and the error (0 − target)/target = −1 is clipped to −0.2:
    β₂ = β₁·(1 − 0.2·n/horizon) with n = 8 samples (8 prompts x 1), horizon 100."""
    assert ppo.PPOConfig().kl_horizon == 10000  # OpenAI's lm-human-preferences and TRL
    ppo.train(ppo_config(tiny_model_dir, tmp_path, monkeypatch, max_steps=2, target_kl=0.01, kl_horizon=100))
    betas = [r["kl_coef"] for r in _metrics(tmp_path / "run") if "reward/mean" in r]
    assert betas[0] == 0.05
    assert betas[1] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100), rel=1e-12)
