"""PPO reaches the exact KL-regularised optimum of a bandit; the trainer raises a reward; the value head starts
at exactly 0 and survives checkpoint/resume; the missing-EOS penalty is exact; LoRA's reference is the base."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alignkit.algos import ppo
from alignkit.config import ModelConfig
from alignkit.engine import Engine, TrainConfig
from alignkit.logprobs import token_logprobs
from alignkit.online import RolloutConfig, reference_logprobs
from alignkit.rollout import SamplingConfig, sample

EOS, PROMPT = 0, 3  # the bandit's vocabulary: EOS (also padding), two words 1 and 2, the prompt token 3
WORDS = (1, 2, 3)
MAX_NEW = 3


def _outcomes() -> list[tuple[int, ...]]:
    """Every response the sampler can return with max_new_tokens=3: k non-EOS tokens then EOS (k < 3), or 3
    non-EOS tokens (truncated). 1 + 3 + 9 + 27 = 40 sequences; their probabilities sum to 1."""
    ended = [p + (EOS,) for k in range(MAX_NEW) for p in itertools.product(WORDS, repeat=k)]
    return ended + list(itertools.product(WORDS, repeat=MAX_NEW))


def _bandit_reward(response: tuple[int, ...]) -> float:
    return float(sum(t == 1 for t in response))  # how often word 1 appears


@torch.no_grad()
def _sequence_probs(model, responses: list[tuple[int, ...]]) -> torch.Tensor:
    """Exact π(y | prompt) of each response: the product of its token probabilities (teacher forcing)."""
    length = 1 + max(map(len, responses))
    ids = torch.zeros(len(responses), length, dtype=torch.long)
    attention, target = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, y in enumerate(responses):
        ids[i, 0], ids[i, 1 : 1 + len(y)] = PROMPT, torch.tensor(y)
        attention[i, : 1 + len(y)], target[i, 1 : 1 + len(y)] = 1, True
    return token_logprobs(model, ids, target, attention).sum(-1).exp()


def test_ppo_bandit_reaches_kl_regularised_optimum(tmp_path):
    """With the KL in the reward and γ = 1, the return of the first token is the whole sequence's
    r(y) − β·Σ_t log(π(y_t|·)/π_ref(y_t|·)) = r(y) − β·log(π(y)/π_ref(y)), so PPO ascends
    J(π) = E_π[r] − β·KL(π‖π_ref) = −β·KL(π‖π*) + β·log Z  with  π*(y) = π_ref(y)·exp(r(y)/β) / Z:
    the per-token penalty is exactly the sequence-level one, and the optimum over sequence distributions is π*
    (treating the penalty as a reward is unbiased: E_π[∇log π] = 0 kills the term its own gradient would add).

    All 40 responses are enumerable, so π, π_ref and π* are computed exactly. π_ref (a random 1-layer model,
    near-uniform per token) is at TV ≈ 0.34 from π* (β = 1, r = count of word 1). The threshold TV < 0.1: one
    batch of 128 samples is itself at expected TV ≈ 0.2 from the distribution it came from, so 0.1 needs the
    policy to have averaged over many rollouts, and a policy that only maximised r (all "1 1 1") would be at
    TV ≈ 0.8. In trials (3 seeds) the run ends at TV ≈ 0.045-0.05.
    """
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=16, eos_token_id=EOS, pad_token_id=EOS,
                         bos_token_id=PROMPT)
    model = LlamaForCausalLM(config).eval()
    responses = _outcomes()
    rewards = torch.tensor([_bandit_reward(y) for y in responses])
    beta, steps, batch = 1.0, 30, 128
    p_ref = _sequence_probs(model, responses)
    assert p_ref.sum().item() == pytest.approx(1.0, abs=1e-5)  # the enumeration is complete
    p_star = p_ref * torch.exp(rewards / beta)
    p_star /= p_star.sum()

    def tv(p: torch.Tensor) -> float:
        return 0.5 * float((p - p_star).abs().sum())

    assert tv(p_ref) > 0.3
    assert tv((rewards == 3).float() / (rewards == 3).sum()) > 0.7  # pure reward maximisation is far from π*
    cfg = ppo.PPOConfig(
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=steps, batch_size=batch, lr=2e-2,
                          schedule="linear", mixed_precision="no", report_to="none", progress=False),
        kl_coef=beta,
    )  # one minibatch of 128 rows: 4 optimizer steps (PPO epochs) per rollout
    head = ppo.value_head_for(model)
    module = ppo.PolicyValueModel(model, head).eval()
    engine = Engine(cfg.train, model, None, steps * cfg.ppo_epochs, train_module=module,
                    extra_modules={"value_head": head})
    ref_fn = reference_logprobs(model, False, "", 1.0, batch, engine.autocast, packing=cfg.packing)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rollout = sample(model, [[PROMPT]] * batch, SamplingConfig(max_new_tokens=MAX_NEW), eos_token_id=EOS,
                         pad_token_id=EOS, generator=generator)
        scores = torch.tensor([_bandit_reward(tuple(row[m.bool()].tolist()))
                               for row, m in zip(rollout.response_ids, rollout.response_mask, strict=True)])
        metrics = ppo.ppo_update(engine, module, ref_fn, rollout, scores, cfg, beta)
    assert tv(_sequence_probs(model, responses)) < 0.1
    assert metrics["kl"] > 0.05  # it got there by moving away from π_ref, as π* requires
    exact_kl = float((p_star * (p_star / p_ref).log()).sum())
    assert exact_kl > 0.2


# ----------------------------------------------------------------------------------------------- trainer
REWARD_MODULE = '''
def chars(completion: str) -> float:
    return len(completion) / 10.0
'''


def _config(model_dir, tmp_path, monkeypatch, **overrides) -> ppo.PPOConfig:
    (tmp_path / "ppo_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = RolloutConfig(reward="ppo_test_rewards:chars", prompts_per_step=overrides.pop("prompts_per_step", 8),
                            group_size=1, max_new_tokens=overrides.pop("max_new_tokens", 4),
                            temperature=overrides.pop("temperature", 1.0), eval_prompts=overrides.pop("eval_prompts", 0))
    train = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=overrides.pop("max_steps", 2), batch_size=8,
                        lr=overrides.pop("lr", 1e-3), schedule="constant", save_steps=overrides.pop("save_steps", 0),
                        resume=overrides.pop("resume", False), mixed_precision="no", report_to="none", progress=False)
    return ppo.PPOConfig(model=ModelConfig(model=str(model_dir), lora=overrides.pop("lora", False)), train=train,
                         rollout=rollout, **overrides)


def _metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_trainer_raises_reward(tiny_model_dir, tmp_path, monkeypatch):
    """Reward = characters / 10 of the completion. The random tiny model's logits are nearly flat, so sampling
    at temperature 0.05 (the loss divides the logits by it too) gives a policy that can move in few steps; the
    held-out mean reward (same prompts and sampling seed before and after) must rise clearly."""
    cfg = _config(tiny_model_dir, tmp_path, monkeypatch, max_steps=3, temperature=0.05, lr=2e-3, eval_prompts=8,
                  max_new_tokens=6)
    ppo.train(cfg)
    rows = _metrics(tmp_path)
    evals = [r for r in rows if "eval/reward/mean" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 3 * cfg.ppo_epochs  # logged by optimizer step
    assert before["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert after["eval/reward/mean"] > before["eval/reward/mean"] + 1.0, (before, after)
    train_rows = [r for r in rows if "reward/mean" in r]
    assert train_rows[0]["kl"] == 0.0  # first rollout: old policy == reference
    for name in ("reward/std", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss", "response/length",
                 "response/no_eos", "distinct-2"):
        assert name in train_rows[0]
    for row in train_rows:  # the step's wall time split (the reference is the LoRA-free initial copy)
        assert 0 < row["time/reward"] < row["time/rollout"] and 0 < row["time/reference"] < row["time/update"]
    assert (tmp_path / "run" / "final" / "value_head.safetensors").exists()


def test_value_head_starts_at_zero_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """Zero-init head: V ≡ 0 on a real rollout. A run interrupted after PPO step 1 and resumed from its checkpoint
    ends with the same value head (and β controller) as the uninterrupted run: the engine restores the extra
    modules, and rollouts are seeded per step."""
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    module = ppo.PolicyValueModel(model, ppo.value_head_for(model)).eval()
    # fp32 pinned: the claim is about the kernels, not precision (a native-bf16 CPU samples in bf16 by default)
    rollout = sample(model, [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=4, dtype="fp32"), tokenizer=tokenizer)
    with torch.no_grad():
        logps, values, _ = ppo.policy_outputs(module, rollout, 1.0)
    assert torch.equal(values, torch.zeros_like(values))
    assert torch.allclose(logps, rollout.logprobs, atol=1e-4)  # the training forward scores what was sampled

    cfg = _config(tiny_model_dir, tmp_path, monkeypatch, max_steps=2, save_steps=1, target_kl=0.01)
    ppo.train(cfg)
    uninterrupted = load_file(tmp_path / "run" / "final" / "value_head.safetensors")
    beta = load_file(tmp_path / "run" / "final" / "kl_controller.safetensors")["coef"]
    assert float(beta) != 0.05  # the adaptive controller moved β, so restoring it is tested
    # checkpoints are named by optimizer step: 8 rows = one minibatch, so ppo_epochs = 4 steps per rollout
    assert (tmp_path / "run" / f"checkpoint-{cfg.ppo_epochs}" / "value_head.safetensors").exists()
    assert float(uninterrupted["weight"].abs().sum()) > 0  # trained away from the zero init
    ppo.train(_config(tiny_model_dir, tmp_path, monkeypatch, max_steps=2, save_steps=1, target_kl=0.01, resume=True))
    resumed = load_file(tmp_path / "run" / "final" / "value_head.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load_file(tmp_path / "run" / "final" / "kl_controller.safetensors")["coef"], beta)


def test_missing_eos_penalty_is_exact(tiny_model_dir, tmp_path, monkeypatch):
    rewards = torch.tensor([0.5, -2.0, 3.0, 0.0])
    ended = torch.tensor([True, False, False, True])
    assert ppo.final_scores(rewards, ended, -1.0, False).tolist() == [0.5, -3.0, 2.0, 0.0]
    assert ppo.final_scores(rewards, ended, -1.0, True).tolist() == [0.5, -1.0, -1.0, 0.0]
    assert ppo.final_scores(rewards, ended, 0.0, False) is rewards  # off
    # through the trainer: the tiny random model never samples EOS in 4 tokens, so every score is shifted
    # (PPO-ptx rides along to check its wiring; its value is tested below)
    ptx = tmp_path / "sft.jsonl"
    ptx.write_text("".join(json.dumps({"prompt": "Hi", "completion": f" friend {i}."}) + "\n" for i in range(4)))
    ppo.train(_config(tiny_model_dir, tmp_path, monkeypatch, max_steps=1, missing_eos_penalty=-0.5, ptx_coef=0.1,
                      ptx_data=str(ptx)))
    row = [r for r in _metrics(tmp_path) if "score/mean" in r][0]
    assert row["ptx_loss"] > 0
    assert row["response/no_eos"] == 1.0
    assert row["score/mean"] == pytest.approx(row["reward/mean"] - 0.5, abs=1e-6)


def test_lora_reference_is_the_base_with_adapter_disabled(tiny_model_dir, tmp_path, monkeypatch):
    """One base for policy, reference and value head: KL is exactly 0 on the first rollout (LoRA's B = 0), then
    positive once the adapter has moved; only the adapter and the value head are trained."""
    cfg = _config(tiny_model_dir, tmp_path, monkeypatch, max_steps=2, lora=True, lr=5e-3, temperature=0.05)
    path = ppo.train(cfg)
    rows = [r for r in _metrics(tmp_path) if "kl" in r]
    assert rows[0]["kl"] == 0.0
    assert rows[1]["kl"] > 1e-3
    assert (path / "adapter_model.safetensors").exists() and (path / "value_head.safetensors").exists()
    assert not math.isnan(rows[1]["value_loss"])


def test_ptx_loss_is_coef_times_sft_token_mean(tiny_model_dir):
    """PPO-ptx: with zero advantages, returns and old values the PPO terms vanish, so the summed loss divided by
    the engine's normaliser (response tokens) must be exactly ptx_coef x the SFT token-mean NLL, computed here
    independently."""
    from alignkit.data import Record, pad_sft, sft_example
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    module = ppo.PolicyValueModel(model, ppo.value_head_for(model)).eval()
    rollout = sample(model, [[1, 2, 3], [4, 5], [6]], SamplingConfig(max_new_tokens=4), tokenizer=tokenizer,
                     generator=torch.Generator().manual_seed(0))
    sft = [sft_example(Record({"prompt": p, "completion": c}, "x"), tokenizer, None)
           for p, c in [("Hi", " there, friend."), ("The film", " was long.")]]
    zeros = torch.zeros(rollout.response_mask.shape)
    batches = [{"rollout": ppo.take(rollout, slice(0, 2)), "old_logps": zeros[:2], "old_values": zeros[:2],
                "advantages": zeros[:2], "returns": zeros[:2]},
               {"rollout": ppo.take(rollout, slice(2, 3)), "old_logps": zeros[2:], "old_values": zeros[2:],
                "advantages": zeros[2:], "returns": zeros[2:]}]
    cfg = ppo.PPOConfig(ptx_coef=0.7)
    ppo._attach_ptx(batches, sft, cfg, tokenizer.pad_token_id)
    with torch.no_grad():
        total = sum(float(ppo.ppo_loss(module, b, cfg)[0]) for b in batches)
        full = pad_sft(sft, tokenizer.pad_token_id)
        target = full["labels"] != -100
        nll = -(token_logprobs(model, full["input_ids"], target, full["attention_mask"]) * target).sum() / target.sum()
    n_response = int(rollout.response_mask.sum())
    assert total / n_response == pytest.approx(0.7 * float(nll), rel=1e-5)


def test_critic_initialised_from_reward_model(tiny_model_dir, tmp_path, monkeypatch):
    """--critic RM_DIR: V(x, y_<t) at the start is the reward model's score of the prefix x, y_<t (its score head
    on its own backbone), checked against ``sequence_scores`` on each truncated prefix; the trainer saves the
    trained critic beside the policy."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from alignkit.models import load_model
    from alignkit.rewards import sequence_scores

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    model, tokenizer = load_model(str(tiny_model_dir))
    tokenizer.save_pretrained(rm_dir)
    critic, backbone, head = ppo.critic_from_reward_model(str(rm_dir), tokenizer)
    module = ppo.PolicyValueModel(model, head, backbone).eval()
    rollout = sample(model, [[5, 6, 7], [8, 9, 10]], SamplingConfig(max_new_tokens=4), tokenizer=tokenizer,
                     generator=torch.Generator().manual_seed(0))  # equal prompt lengths: no padding
    with torch.no_grad():
        _, values, _ = ppo.policy_outputs(module, rollout, 1.0)
        P = rollout.prompt_ids.shape[1]
        for t in range(int(rollout.response_mask[0].sum())):
            prefix = rollout.input_ids[:1, : P + t]
            expected = sequence_scores(critic, prefix, torch.ones_like(prefix))
            assert float(values[0, t]) == pytest.approx(float(expected[0]), abs=1e-5)
    assert float(values.abs().sum()) > 0  # not the zero-init head
    path = ppo.train(_config(tiny_model_dir, tmp_path, monkeypatch, max_steps=1, critic=str(rm_dir)))
    trained = load_file(path / "critic.safetensors")
    assert not torch.equal(trained["score.weight"], rm.score.weight.detach())
