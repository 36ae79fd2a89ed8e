"""RAFT keeps the best sample per prompt (by reward, or by reward − β·log-ratio) and raises the reward on a task
with a known optimum; best-of-N picks the best of its samples and its KL formula holds where it should."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl

from alignkit.algos import bon, raft
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import IGNORE, PromptExample, preference_example, ranked_example, read_examples
from alignkit.engine import TrainConfig
from alignkit.models import load_tokenizer
from alignkit.online import RolloutConfig, ScoredRollout
from alignkit.rollout import Rollout

# The task: reward "length:8" = −|words − 8| with responses capped at 8 tokens. A random tiny model writes about
# 5.7 words in 8 tokens (a token either starts a new word, with a leading space, or continues one), so the
# optimum (0: every token starts a word) is known and reachable by shifting mass towards space-initial tokens.
MAX_NEW = 8


def _prompts(tmp_path, n: int, name: str) -> str:
    return str(write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"Review {name} {i}:"} for i in range(n)]))


def _raft_config(model_dir, tmp_path, **overrides) -> raft.RAFTConfig:
    train = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=8, lr=overrides.pop("lr", 2e-2), schedule="constant",
                        mixed_precision="no", report_to="none", progress=False,
                        save_steps=overrides.pop("save_steps", 0), resume=overrides.pop("resume", False))
    return raft.RAFTConfig(
        model=ModelConfig(model=str(model_dir), lora=overrides.pop("lora", False)),
        data=DataConfig(data=_prompts(tmp_path, 32, "train"), eval_data=overrides.pop("eval_data", _prompts(tmp_path, 16, "test")),
                        max_length=32),
        train=train,
        rollout=RolloutConfig(reward=f"length:{MAX_NEW}", prompts_per_step=overrides.pop("prompts", 16),
                              group_size=overrides.pop("group_size", 8), max_new_tokens=MAX_NEW, eval_prompts=16),
        **overrides,
    )


def _metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_raft_raises_reward_on_known_task(tiny_model_dir, tmp_path):
    raft.train(_raft_config(tiny_model_dir, tmp_path, stages=3, sft_epochs=2))
    rows = _metrics(tmp_path)
    stages = [r for r in rows if "stage" in r]
    evals = [r for r in rows if "eval/reward/mean" in r]
    assert [s["stage"] for s in stages] == [1, 2, 3]
    # stage 1 samples the initial policy: log π/π_0 is exactly 0 (both through the same forward, in any
    # precision) and the kept reward is a best-of-8
    assert stages[0]["kl"] == 0.0
    assert stages[0]["reward/kept"] > stages[0]["reward/mean"] + 1.0
    assert stages[-1]["kl"] > 0.1
    assert stages[-1]["reward/mean"] > stages[0]["reward/mean"] + 1.0, stages
    before, after = evals[0], evals[-1]
    assert before["eval/kl"] == 0.0
    assert after["eval/reward/mean"] > before["eval/reward/mean"] + 1.0, (before, after)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------- selection


def _hand_rollout() -> ScoredRollout:
    """2 prompts x 3 responses with hand-made tokens: prompts left-padded (pad 0), responses right-padded."""
    prompts = [PromptExample([11, 12, 13], "a"), PromptExample([21], "b")]
    rows = [p for p in prompts for _ in range(3)]
    prompt_ids = torch.tensor([[11, 12, 13]] * 3 + [[0, 0, 21]] * 3)
    prompt_mask = (prompt_ids != 0).long()
    response_ids = torch.tensor([[101, 102, 0], [111, 0, 0], [121, 122, 123],
                                 [201, 0, 0], [211, 212, 0], [221, 222, 223]])
    response_mask = (response_ids != 0).long()
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(6, 3), torch.ones(6, dtype=torch.bool))
    rewards = torch.tensor([0.5, 2.0, 1.0, -1.0, -3.0, -0.5])
    return ScoredRollout(rollout, rows, ["x"] * 6, rewards)


def test_kept_sample_is_the_argmax_per_prompt():
    scored = _hand_rollout()
    rows = raft.select_best(raft.ranking_scores(scored.rewards, torch.zeros(6), 0.0), 3)
    assert rows.tolist() == [1, 5]  # rewards 2.0 (prompt a) and -0.5 (prompt b)
    kept = raft.kept_examples(scored, rows)
    assert kept[0].input_ids == [11, 12, 13, 111] and kept[0].labels == [IGNORE] * 3 + [111]
    assert kept[1].input_ids == [21, 221, 222, 223] and kept[1].labels == [IGNORE, 221, 222, 223]


def test_kl_ranked_selection_is_argmax_of_reward_minus_beta_log_ratio():
    scored = _hand_rollout()
    log_ratio = torch.tensor([0.0, 4.0, 1.0, 0.0, -2.0, 3.0])
    # β = 0.5: scores a: 0.5, 0.0, 0.5 -> first of the tie (row 0); b: -1.0, -2.0, -2.0 -> row 3
    scores = raft.ranking_scores(scored.rewards, log_ratio, 0.5)
    assert scores.tolist() == pytest.approx([0.5, 0.0, 0.5, -1.0, -2.0, -2.0])
    assert raft.select_best(scores, 3).tolist() == [0, 3]
    # β = 0.1: a: 0.5, 1.6, 0.9 -> row 1; b: -1.0, -2.8, -0.8 -> row 5
    assert raft.select_best(raft.ranking_scores(scored.rewards, log_ratio, 0.1), 3).tolist() == [1, 5]


def test_raft_stage_keeps_argmax_of_real_rollout(tiny_model_dir, tmp_path, monkeypatch):
    """Inside the trainer, the kept samples are exactly the argmax-reward responses of each prompt's group."""
    seen: list[tuple[ScoredRollout, list]] = []
    real = raft.kept_examples

    def spy(scored, rows):
        out = real(scored, rows)
        seen.append((scored, out))
        return out

    monkeypatch.setattr(raft, "kept_examples", spy)
    raft.train(_raft_config(tiny_model_dir, tmp_path, stages=1, eval_data="", group_size=4))
    (scored, kept), = seen
    groups = scored.rewards.view(-1, 4)
    for g, example in enumerate(kept):
        best = g * 4 + int(groups[g].argmax())
        response = scored.rollout.response_ids[best][scored.rollout.response_mask[best].bool()].tolist()
        assert example.input_ids == scored.prompts[best].prompt_ids + response
        assert example.labels[-len(response):] == response
    assert len(kept) == 16


def test_raft_resume_at_stage_boundary_equals_uninterrupted(tiny_model_dir, tmp_path, monkeypatch):
    """A run that dies while sampling stage 2 and resumes from the stage-1 checkpoint ends with the weights of the
    uninterrupted run (8 prompts x 4 samples, one optimizer step per stage)."""
    from safetensors.torch import load_file

    small = dict(stages=2, eval_data="", prompts=8, group_size=4)
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir(), broken.mkdir()
    raft.train(_raft_config(tiny_model_dir, full, **small))
    real_reward = raft.load_reward(f"length:{MAX_NEW}")
    calls = []

    def dies_in_stage_two(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) > 1:
            raise RuntimeError("killed")
        return real_reward(prompts, completions)

    with monkeypatch.context() as patch:
        patch.setattr(raft, "load_reward", lambda spec: dies_in_stage_two)
        with pytest.raises(RuntimeError, match="killed"):
            raft.train(_raft_config(tiny_model_dir, broken, save_steps=1, **small))
    assert (broken / "run" / "checkpoint-1").exists() and not (broken / "run" / "final").exists()
    raft.train(_raft_config(tiny_model_dir, broken, save_steps=1, resume=True, **small))
    a = load_file(full / "run" / "final" / "model.safetensors")
    b = load_file(broken / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    resumed = [r for r in _metrics(broken) if "stage" in r]
    assert [r["stage"] for r in resumed] == [1, 2]  # stage 1 logged before the crash, stage 2 after resuming


def test_raft_lora_reference_is_the_base(tiny_model_dir, tmp_path):
    raft.train(_raft_config(tiny_model_dir, tmp_path, stages=2, lora=True, lr=1e-2, eval_data="", kl_beta=0.1,
                            prompts=8, group_size=4))
    stages = [r for r in _metrics(tmp_path) if "stage" in r]
    assert stages[0]["kl"] == 0.0  # LoRA B starts at zero: policy == base
    assert abs(stages[1]["kl"]) > 1e-3
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ best-of-N


def test_bon_writes_best_of_its_samples(tiny_model_dir, tmp_path):
    cfg = bon.BoNConfig(
        model=ModelConfig(model=str(tiny_model_dir)),
        data=DataConfig(data=_prompts(tmp_path, 6, "test"), max_length=32),
        rollout=RolloutConfig(reward=f"length:{MAX_NEW}", prompts_per_step=4, group_size=4, max_new_tokens=MAX_NEW),
        output_dir=str(tmp_path / "bon"),
    )
    result = bon.run(cfg)
    records = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [f"Review test {i}:" for i in range(6)]
    for r in records:
        assert len(r["scores"]) == 4 and len(r["responses"]) == 4
        assert r["reward"] == max(r["scores"])
        assert r["completion"] == r["responses"][r["scores"].index(max(r["scores"]))]
        # the reward is recomputable from the text: −|words − 8|
        assert r["reward"] == -abs(len(r["completion"].split()) - MAX_NEW)
    best = sum(r["reward"] for r in records) / 6
    single = sum(sum(r["scores"]) for r in records) / 24
    assert result.mean_best_reward == pytest.approx(best) and result.mean_reward == pytest.approx(single)
    assert result.mean_best_reward >= result.mean_reward
    assert result.kl == pytest.approx(math.log(4) - 0.75)
    summary = json.loads((tmp_path / "bon" / "summary.json").read_text())
    assert summary["n"] == 4 and summary["prompts"] == 6

    # pairs.jsonl: best vs worst of each prompt whose rewards differ, readable as DPO data
    pairs = [json.loads(line) for line in (tmp_path / "bon" / "pairs.jsonl").read_text().splitlines()]
    expected = [r for r in records if max(r["scores"]) > min(r["scores"])]
    assert summary["pairs"] == len(pairs) == len(expected)
    for pair, r in zip(pairs, expected):
        assert pair["prompt"] == r["prompt"] and pair["chosen"] == r["completion"]
        assert pair["rejected"] == r["responses"][r["scores"].index(min(r["scores"]))]
        assert pair["margin"] == pytest.approx(max(r["scores"]) - min(r["scores"]))
    assert pairs, "length rewards of 4 random samples are almost never all equal"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert len(read_examples(str(tmp_path / "bon" / "pairs.jsonl"), preference_example, tokenizer, 64)) == len(pairs)
    # and bon.jsonl is RRHF's ranked shape
    assert len(read_examples(str(result.path), ranked_example, tokenizer, 64)) == 6


def test_bon_kl_formula_by_hand():
    assert bon.bon_kl(1) == 0.0
    assert bon.bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon.bon_kl(4) == pytest.approx(1.3862943611198906 - 0.75)
    with pytest.raises(ValueError):
        bon.bon_kl(0)


def _bon_pmf(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Exact best-of-n pmf for outcomes sorted by increasing (distinct) reward: F(i)^n − F(i−1)^n."""
    cdf = probs.double().cumsum(0)
    return cdf**n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n


def test_bon_kl_is_exact_for_continuous_rewards_monte_carlo():
    """π = N(0, 1), reward r(y) = y. The best of n has density n Φ(y)^(n−1) φ(y), so log π_BoN/π = log n +
    (n−1) log Φ(y); its Monte-Carlo mean over sampled maxima must match log n − (n−1)/n."""
    generator = torch.Generator().manual_seed(0)
    for n in (2, 4, 16):
        best = torch.randn(200_000, n, generator=generator, dtype=torch.float64).max(-1).values
        cdf = 0.5 * (1 + torch.erf(best / math.sqrt(2)))
        kl = float((math.log(n) + (n - 1) * cdf.log()).mean())
        assert kl == pytest.approx(bon.bon_kl(n), abs=0.01), n


def test_bon_kl_is_an_upper_bound_on_a_small_categorical():
    """On 3 outcomes with distinct rewards the true KL is strictly below the formula (Beirami et al. 2024); the
    sampled best-of-4 frequencies match the exact pmf, and on a large uniform space the formula becomes exact.

    By hand: p = (0.2, 0.5, 0.3), F = (0.2, 0.7, 1), pmf = (0.0016, 0.2385, 0.7599),
    KL = 0.0016 ln 0.008 + 0.2385 ln 0.477 + 0.7599 ln 2.533 = 0.522 < log 4 − 3/4 = 0.636."""
    probs = torch.tensor([0.2, 0.5, 0.3])  # outcome i has reward i
    n = 4
    pmf = _bon_pmf(probs, n)
    torch.testing.assert_close(pmf, torch.tensor([0.0016, 0.2385, 0.7599], dtype=torch.float64), atol=1e-6, rtol=0)
    draws = torch.multinomial(probs, 100_000 * n, replacement=True, generator=torch.Generator().manual_seed(0))
    best = draws.view(-1, n).max(-1).values  # highest reward = highest index
    freq = torch.bincount(best, minlength=3).double() / best.numel()
    torch.testing.assert_close(freq, pmf, atol=5e-3, rtol=0)
    empirical_kl = float((freq * (freq / probs.double()).log()).sum())
    exact_kl = float((pmf * (pmf / probs.double()).log()).sum())
    assert exact_kl == pytest.approx(0.522, abs=1e-3)
    assert empirical_kl == pytest.approx(exact_kl, abs=0.01)
    assert exact_kl < bon.bon_kl(n) - 0.1
    uniform = torch.full((100_000,), 1e-5, dtype=torch.float64)
    pmf = _bon_pmf(uniform, n)
    assert float((pmf * (pmf / uniform).log()).sum()) == pytest.approx(bon.bon_kl(n), abs=1e-3)
