"""DPO learns a preference with a known answer; every variant runs through the trainer; the cheap reference
paths (precomputed, LoRA adapter disabled) agree with each other."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from alignkit.algos import dpo
from alignkit.config import DataConfig, ModelConfig
from alignkit.engine import TrainConfig

GOOD = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "charming", "excellent"]
BAD = ["awful", "boring", "dreadful", "clumsy", "tedious", "terrible", "bland", "painful"]


def _pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers use words from GOOD, rejected from BAD; prompts and word combinations vary, so held-out
    pairs are new sentences and only the preference itself transfers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Review {seed}-{i} of the film '{rng.choice(['Dune', 'Heat', 'Alien', 'Up', 'Jaws'])}':"
        rows.append({"prompt": prompt,
                     "chosen": " It was " + " and ".join(rng.sample(GOOD, 2)) + ".",
                     "rejected": " It was " + " and ".join(rng.sample(BAD, 2)) + "."})
    return rows


def _config(model_dir, tmp_path, **overrides) -> dpo.DPOConfig:
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(64, seed=1))
    held_out = write_jsonl(tmp_path / "test.jsonl", _pairs(32, seed=2))
    steps = overrides.pop("max_steps", 30)
    lora = overrides.pop("lora", False)
    return dpo.DPOConfig(
        model=ModelConfig(model=str(model_dir), lora=lora),
        data=DataConfig(data=str(train), eval_data=str(held_out), max_length=128),
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=steps, batch_size=8, lr=overrides.pop("lr", 2e-3),
                          mixed_precision="no", report_to="none", progress=False),
        **overrides,
    )


def _evals(tmp_path) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/rewards/accuracies" in r or "eval/loss" in r]


def test_dpo_learns_held_out_preference(tiny_model_dir, tmp_path):
    dpo.train(_config(tiny_model_dir, tmp_path))
    before, after = _evals(tmp_path)[0], _evals(tmp_path)[-1]
    assert before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert after["eval/rewards/accuracies"] > 0.9, after
    assert after["eval/loss"] < before["eval/loss"] - 0.2


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_variant_trains_and_reports(tiny_model_dir, tmp_path, loss):
    smoothing = 0.1 if loss == "robust" else 0.0
    beta = 2.0 if loss == "simpo" else 0.1
    dpo.train(_config(tiny_model_dir, tmp_path, loss=loss, label_smoothing=smoothing, beta=beta, max_steps=12))
    first, last = _evals(tmp_path)[0], _evals(tmp_path)[-1]
    assert last["eval/loss"] < first["eval/loss"], (first, last)
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())


def test_lora_reference_precomputed_equals_adapter_disabled_live(tiny_model_dir, tmp_path):
    """With LoRA the reference is the base with the adapter off. Precomputing it once before training and
    computing it live each step (adapter disabled on the *training* model) must give the same run."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    dpo.train(_config(tiny_model_dir, a, lora=True, lr=5e-3, max_steps=4, precompute_ref=True))
    dpo.train(_config(tiny_model_dir, b, lora=True, lr=5e-3, max_steps=4, precompute_ref=False))
    wa = load_file(a / "run" / "final" / "adapter_model.safetensors")
    wb = load_file(b / "run" / "final" / "adapter_model.safetensors")
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 1e-4  # the adapter trained
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_unknown_loss_is_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--loss 'nope': expected one of sigmoid, ipo"):  # checked first, as the CLI does
        dpo.train(_config(tiny_model_dir, tmp_path, loss="nope"))


def test_soft_labels_are_per_pair_cdpo_smoothing(tiny_model_dir, tmp_path):
    """An AI labeller's soft label p (``alignkit label``) is the pair's cDPO ε = 1 − p:
    loss = −p·log σ(βh) − (1 − p)·log σ(−βh); hard pairs keep --label-smoothing. By hand for β = 0.1, h = 2 and
    h = −1: σ(0.2) = 0.549834, σ(−0.1) = 0.475021."""
    import math

    from alignkit.data import build_examples, load_records
    from alignkit.models import load_tokenizer

    cfg = dpo.DPOConfig(loss="sigmoid", beta=0.1, label_smoothing=0.1)
    objective = dpo.make_objective(cfg)
    ones = torch.ones(2)
    pairs = dpo.PairLogps(torch.tensor([2.0, -1.0]), torch.zeros(2), ones, ones, torch.zeros(2), torch.zeros(2),
                          torch.tensor([1.0, 0.7]))
    got, _ = objective(pairs)
    s0, s1 = 0.549834, 0.475021
    want = [-(0.9 * math.log(s0) + 0.1 * math.log(1 - s0)), -(0.7 * math.log(s1) + 0.3 * math.log(1 - s1))]
    assert got.tolist() == pytest.approx(want, abs=1e-5)

    # the label reaches the loss through the data layer and the collate
    tok = load_tokenizer(str(tiny_model_dir))
    records = load_records([{"prompt": "Hi", "chosen": " yes.", "rejected": " no.", "label": 0.8},
                            {"prompt": "Hi", "chosen": " ok.", "rejected": " no."}])
    examples, _ = build_examples(records, dpo.preference_example, tok)
    batch = dpo.collate_pairs([(e, 0.0, 0.0) for e in examples], tok.pad_token_id)
    assert batch["label"].tolist() == pytest.approx([0.8, 1.0])

    # a loss without a soft-label form refuses such data, naming the record
    data = write_jsonl(tmp_path / "soft.jsonl", [{"prompt": "Hi", "chosen": " yes.", "rejected": " no.", "label": 0.8}] * 4)
    with pytest.raises(dpo.DataError, match=r"soft\.jsonl:1: soft label 0\.8 .*--loss ipo"):
        dpo.train(dpo.DPOConfig(model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=str(data)),
                                train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2,
                                                  report_to="none", progress=False), loss="ipo"))
