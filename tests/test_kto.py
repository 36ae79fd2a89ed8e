"""KTO learns a known preference from unpaired labels; the mismatched KL pairs are a fixed derangement; the
cheap reference paths (precomputed, LoRA adapter disabled) agree; the helpers match hand-computed values."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from alignkit.algos import kto
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import UnpairedExample
from alignkit.engine import TrainConfig

GOOD = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "charming", "excellent"]
BAD = ["awful", "boring", "dreadful", "clumsy", "tedious", "terrible", "bland", "painful"]


def _unpaired(n: int, seed: int) -> list[dict]:
    """Desirable completions use words from GOOD, undesirable ones from BAD, half and half. Prompts and word
    combinations vary, so held-out examples are new sentences and only the preference itself transfers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Review {seed}-{i} of the film '{rng.choice(['Dune', 'Heat', 'Alien', 'Up', 'Jaws'])}':"
        good = i % 2 == 0
        words = rng.sample(GOOD if good else BAD, 2)
        rows.append({"prompt": prompt, "completion": " It was " + " and ".join(words) + ".", "label": good})
    return rows


def _config(model_dir, tmp_path, **overrides) -> kto.KTOConfig:
    train = write_jsonl(tmp_path / "train.jsonl", _unpaired(64, seed=1))
    held_out = write_jsonl(tmp_path / "test.jsonl", _unpaired(32, seed=2))
    steps = overrides.pop("max_steps", 20)
    lora = overrides.pop("lora", False)
    return kto.KTOConfig(
        model=ModelConfig(model=str(model_dir), lora=lora),
        data=DataConfig(data=str(train), eval_data=str(held_out), max_length=128),
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=steps, batch_size=8, lr=overrides.pop("lr", 2e-3),
                          warmup_ratio=0.0, mixed_precision="no", report_to="none", progress=False),
        **overrides,
    )


def _logs(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def _evals(tmp_path) -> list[dict]:
    return [r for r in _logs(tmp_path) if "eval/loss" in r]


def test_kto_learns_held_out_preference(tiny_model_dir, tmp_path):
    kto.train(_config(tiny_model_dir, tmp_path))
    before, after = _evals(tmp_path)[0], _evals(tmp_path)[-1]
    # policy == reference at the start: every implicit reward is 0, z0 is 0, each loss is 1 − σ(0) = 0.5
    assert before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert before["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    assert before["eval/loss"] == pytest.approx(0.5, abs=1e-5)
    assert after["eval/rewards/accuracies"] > 0.9, after
    assert after["eval/rewards/chosen"] > 0 > after["eval/rewards/rejected"], after
    assert after["eval/rewards/margins"] > 0.5, after
    assert after["eval/loss"] < before["eval/loss"] - 0.05, (before, after)
    steps = [r for r in _logs(tmp_path) if "loss" in r]
    assert len(steps) == 20 and all(r["kl"] >= 0 for r in steps)
    assert max(r["kl"] for r in steps) > 0  # the policy moved, and the mismatched pairs saw it


def test_mismatched_pairs_are_a_fixed_derangement():
    """Each example is paired with exactly one other example's completion, every completion is used once,
    the pairing depends only on the seed, and a pair longer than max_length has its completion cut."""
    examples = [UnpairedExample([1, 2, 3], [10 + i] * (i + 1), bool(i % 2)) for i in range(7)]
    kl = kto.mismatched_completions(examples, seed=3, max_length=100)
    sources = [next(j for j, e in enumerate(examples) if e.completion_ids == ids) for ids in kl]
    assert sorted(sources) == list(range(7))  # a permutation
    assert all(j != i for i, j in enumerate(sources))  # with no fixed point
    assert kto.mismatched_completions(examples, seed=3, max_length=100) == kl
    assert kto.mismatched_completions(examples, seed=4, max_length=100) != kl
    cut = kto.mismatched_completions(examples, seed=3, max_length=5)  # prompt 3 tokens: room for 2
    assert [len(ids) for ids in cut] == [min(2, len(ids)) for ids in kl]


def test_implicit_reward_accuracy_by_hand():
    desirable = torch.tensor([True, False, True, False])
    # desirable rewards {1, 3}, undesirable {2, 0}: pairs (1,2) wrong, (1,0) (3,2) (3,0) right -> 3/4
    assert float(kto.implicit_reward_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), desirable)) == 0.75
    assert float(kto.implicit_reward_accuracy(torch.zeros(4), desirable)) == 0.0  # ties are not right
    assert float(kto.implicit_reward_accuracy(torch.tensor([5.0, -1.0, 4.0, 3.0]), desirable)) == 1.0


def test_balance_note_follows_the_paper_range():
    """λ_D·n_D / (λ_U·n_U) with 6 desirable, 2 undesirable: 3 with unit weights (outside [1, 4/3]); the note
    proposes λ_D in [2/6, 4/3·2/6]; λ_D = 0.4 gives 1.2, inside the range, so no note."""
    examples = [UnpairedExample([1], [2], i < 6) for i in range(8)]
    note = kto.balance_note(examples, kto.KTOConfig())
    assert note is not None and "= 3;" in note and "between 0.333 and 0.444" in note
    assert kto.balance_note(examples, kto.KTOConfig(desirable_weight=0.4)) is None


def test_lora_reference_precomputed_equals_adapter_disabled_live(tiny_model_dir, tmp_path):
    """With LoRA the reference is the base with the adapter off. Precomputing it (labelled and mismatched
    pairs) once and computing it live each step on the training model must give the same run."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    kto.train(_config(tiny_model_dir, a, lora=True, lr=5e-3, max_steps=4, precompute_ref=True))
    kto.train(_config(tiny_model_dir, b, lora=True, lr=5e-3, max_steps=4, precompute_ref=False))
    wa = load_file(a / "run" / "final" / "adapter_model.safetensors")
    wb = load_file(b / "run" / "final" / "adapter_model.safetensors")
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 1e-4  # the adapter trained
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    kl_a = [r["kl"] for r in _logs(a) if "kl" in r]
    kl_b = [r["kl"] for r in _logs(b) if "kl" in r]
    assert kl_a == pytest.approx(kl_b, abs=1e-5)


def test_full_fine_tuning_without_precomputed_reference_needs_a_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs --reference"):
        kto.train(_config(tiny_model_dir, tmp_path, precompute_ref=False))


def test_padding_free_layout_equals_padded_log_probs_gradients_and_training(tiny_model_dir, tmp_path):
    """The packed micro-batch (examples and mismatched pairs each in block-masked rows) and the shared one (each
    prompt once, then its completion and its mismatched one: the reference's and evaluation's layout) give the
    padded layout's completion log-probs and gradients, and a run with --packing the --no-packing run's losses and
    weights."""
    from alignkit.data import read_examples, unpaired_example
    from alignkit.logprobs import LogprobModel
    from alignkit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    data = write_jsonl(tmp_path / "d.jsonl", _unpaired(6, seed=3))
    examples = read_examples(str(data), unpaired_example, tokenizer, 128)
    items = [(e, kl, 0.0, 0.0) for e, kl in zip(examples, kto.mismatched_completions(examples, 0, 128), strict=True)]
    module = LogprobModel(model)
    padded, packed = (kto.collate_unpaired(items, tokenizer.pad_token_id, pack) for pack in (False, True))
    shared = kto.collate_unpaired(items, tokenizer.pad_token_id, pack=True, shared=True)
    assert packed["labelled"]["input_ids"].numel() < padded["input_ids"].numel() // 2  # the padding is gone
    prompt_tokens = sum(len(e.prompt_ids) for e in examples)
    assert int((shared["shared"]["input_ids"] != tokenizer.pad_token_id).sum()) <= \
        sum(int((packed[part]["input_ids"] != tokenizer.pad_token_id).sum()) for part in ("labelled", "mismatched")) \
        - prompt_tokens  # each prompt once
    with pytest.raises(ValueError, match="holds both parts"):
        kto.completion_logps(module, shared, "labelled")
    grads, outputs = [], []
    for batch in (padded, packed, shared):
        if batch is not shared:
            for part in ("labelled", "mismatched"):
                assert kto.completion_logps(module, batch, part).shape == (6,)
        both = kto.completion_logps(module, batch)
        both.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        outputs.append(both.detach())
        model.zero_grad(set_to_none=True)
    for both, grad in zip(outputs[1:], grads[1:], strict=True):
        torch.testing.assert_close(both, outputs[0], atol=1e-4, rtol=1e-5)
        for name in grads[0]:
            torch.testing.assert_close(grad[name], grads[0][name], atol=1e-4, rtol=1e-3)

    runs = {}
    for pack in (True, False):
        out = tmp_path / f"pack-{pack}"
        out.mkdir()
        kto.train(_config(tiny_model_dir, out, max_steps=3, packing=pack))
        runs[pack] = ([r["loss"] for r in _logs(out) if "loss" in r and "eval/loss" not in r],
                      load_file(out / "run" / "final" / "model.safetensors"))
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-4)
    for name, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weight, atol=1e-5, rtol=1e-4)
