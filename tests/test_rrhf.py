"""RRHF learns to rank held-out responses like their scores (from the data or from a reward function); the
training loss is exactly ``losses.rrhf_loss`` on independently computed log-probs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit import losses
from alignkit.algos import rrhf
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import DataError, RankedExample
from alignkit.engine import TrainConfig
from alignkit.logprobs import LogprobModel
from alignkit.rewards import FunctionReward

GOOD = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "charming", "excellent"]
BAD = ["awful", "boring", "dreadful", "clumsy", "tedious", "terrible", "bland", "painful"]

SCORER = f"""
GOOD, BAD = {GOOD!r}, {BAD!r}


def score(completion):
    words = completion.replace(",", " ").replace(".", " ").split()
    return sum(w in GOOD for w in words) - sum(w in BAD for w in words)
"""


def _ranked(n: int, seed: int, with_scores: bool = True) -> list[dict]:
    """Four responses per prompt with 3, 2, 1 and 0 words from GOOD (the rest from BAD), in random order;
    score = number of GOOD words. Prompts and words vary, so held-out prompts bring new sentences."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Review {seed}-{i} of the film '{rng.choice(['Dune', 'Heat', 'Alien', 'Up', 'Jaws'])}':"
        candidates = []
        for good in range(4):
            words = rng.sample(GOOD, good) + rng.sample(BAD, 3 - good)
            rng.shuffle(words)
            candidates.append((f" It was {words[0]}, {words[1]} and {words[2]}.", float(good)))
        rng.shuffle(candidates)
        row = {"prompt": prompt, "responses": [c for c, _ in candidates]}
        if with_scores:
            row["scores"] = [s for _, s in candidates]
        rows.append(row)
    return rows


def _config(model_dir, tmp_path, with_scores: bool = True, **overrides) -> rrhf.RRHFConfig:
    train = write_jsonl(tmp_path / "train.jsonl", _ranked(48, seed=1, with_scores=with_scores))
    held_out = write_jsonl(tmp_path / "test.jsonl", _ranked(24, seed=2, with_scores=with_scores))
    return rrhf.RRHFConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(data=str(train), eval_data=str(held_out), max_length=128),
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=overrides.pop("max_steps", 15), batch_size=4,
                          lr=2e-3, mixed_precision="no", report_to="none", progress=False),
        **overrides,
    )


def _evals(tmp_path) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


def test_rrhf_learns_held_out_ranking(tiny_model_dir, tmp_path):
    rrhf.train(_config(tiny_model_dir, tmp_path))
    before, after = _evals(tmp_path)[0], _evals(tmp_path)[-1]
    assert after["eval/best_is_top"] >= 0.9, (before, after)
    assert after["eval/rank_agreement"] > before["eval/rank_agreement"] + 0.2, (before, after)
    assert after["eval/nll"] < before["eval/nll"]


def test_rrhf_with_scores_from_a_reward_function(tiny_model_dir, tmp_path, monkeypatch):
    """Records without scores; --reward module:function scores every response (train and held-out) before
    training, and the run learns the ranking that function defines."""
    (tmp_path / "film_score.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    rrhf.train(_config(tiny_model_dir, tmp_path, with_scores=False, reward="film_score:score", max_steps=10))
    before, after = _evals(tmp_path)[0], _evals(tmp_path)[-1]
    assert after["eval/best_is_top"] >= 0.9, (before, after)
    assert after["eval/rank_agreement"] > before["eval/rank_agreement"] + 0.2, (before, after)


def test_reward_scores_fill_the_records(tiny_model_dir, tmp_path):
    """score_records gives each response its reward (GOOD words − BAD words), replacing given scores."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward = FunctionReward(lambda c: float(sum(w in c for w in GOOD) - sum(w in c for w in BAD)))
    rows = [{"prompt": "Film:", "responses": [" great and superb.", " dull.", " awful but moving."], "scores": [0, 0, 9]},
            {"prompt": [{"role": "user", "content": "Film?"}],
             "responses": [[{"role": "assistant", "content": "boring"}], [{"role": "assistant", "content": "charming"}]]}]
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    examples = rrhf.read_ranked(path, tokenizer, 128, False, reward)
    assert [e.scores for e in examples] == [[2.0, 0.0, 0.0], [-1.0, 1.0]]


def test_missing_scores_without_a_reward_says_what_to_do(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_jsonl(tmp_path / "ranked.jsonl", _ranked(2, seed=0, with_scores=False))
    with pytest.raises(DataError, match=r"missing field 'scores' \(or pass --reward"):
        rrhf.read_ranked(path, tokenizer, 128, False, None)


def test_best_is_top_by_hand():
    p = torch.tensor([[-1.0, -2.0, -3.0], [-3.0, -1.0, 0.0]])
    scores = torch.tensor([[5.0, 1.0, 0.0], [2.0, 9.0, 99.0]])
    present = torch.tensor([[True, True, True], [True, True, False]])
    # prompt 0: top p is response 0, scored best; prompt 1: response 2 is absent, top p is response 1, best
    assert float(rrhf.best_is_top(p, scores, present)) == 1.0
    scores[0] = torch.tensor([1.0, 5.0, 0.0])  # now response 1 is best but response 0 is most likely
    assert float(rrhf.best_is_top(p, scores, present)) == 0.5


def test_training_loss_is_rrhf_loss_on_independent_logprobs(tiny_model_dir):
    """The step's loss, by hand: every response is scored alone (no padding, no batching) with the plain
    transformers forward, p_i = mean log-prob of its tokens; then losses.rrhf_loss with the SFT term
    −p of the best-scored response. Prompts have 3 and 2 responses (a masked slot), and scores are the
    reverse of the model's own ordering so every ranked pair is violated and the hinge is active."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[[11, 12], [13, 14, 15, 16], [17]], [[18, 19, 20], [21, 22]]]

    def mean_logp(prompt: list[int], response: list[int]) -> float:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)
        return float(logp[len(prompt) - 1 :].mean())

    p = torch.zeros(2, 3)
    present = torch.tensor([[True, True, True], [True, True, False]])
    for b, prompt in enumerate(prompts):
        for k, response in enumerate(responses[b]):
            p[b, k] = mean_logp(prompt, response)
    scores = -p.masked_fill(~present, 0.0)  # most likely response scored worst
    examples = [RankedExample(prompts[b], responses[b], scores[b, : len(responses[b])].tolist()) for b in range(2)]
    best = torch.stack([scores[b, : len(responses[b])].argmax() for b in range(2)])
    expected, metrics = losses.rrhf_loss(p, scores, -p[torch.arange(2), best], present, rank_weight=0.7)
    assert float(metrics["rank_loss"]) > 0 and float(metrics["rank_agreement"]) == 0.0

    batch = rrhf.collate_ranked(examples, pad_id=0)
    loss_sum, logged = rrhf.ranking_loss(LogprobModel(model), batch, rank_weight=0.7)
    assert float(loss_sum.detach()) == pytest.approx(float(expected.sum()), rel=1e-5)
    assert logged["loss"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert logged["nll"] == pytest.approx(float(metrics["nll"]), rel=1e-5)
    assert logged["rank_loss"] == pytest.approx(float(metrics["rank_loss"]), rel=1e-5)
    assert logged["rank_agreement"] == 0.0 and logged["best_is_top"] == 0.0
