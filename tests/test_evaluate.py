"""alignkit evaluate: reward, KL to the reference, distinct-2 and length of samples on held-out prompts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from alignkit.cli import main
from alignkit.config import DataConfig, ModelConfig
from alignkit.evaluate import EvalConfig, run
from alignkit.models import LoraSettings, add_lora, load_model
from alignkit.online import RolloutConfig


def _config(model: str, prompts: str, **kw) -> EvalConfig:
    return EvalConfig(
        model=ModelConfig(model=model),
        data=DataConfig(data=prompts, max_length=32),
        rollout=RolloutConfig(reward="length:6", group_size=3, prompts_per_step=kw.pop("prompts_per_step", 4),
                              max_new_tokens=8),
        **kw,
    )


@pytest.fixture
def prompts(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review number {i}:"} for i in range(5)]))


@pytest.fixture
def lora_dir(tiny_model_dir, tmp_path):
    """A saved LoRA adapter on the tiny model whose B matrices are non-zero, so policy != base."""
    model, tokenizer = load_model(str(tiny_model_dir))
    torch.manual_seed(0)  # before add_lora: its A matrices are random too (else the KL depends on test order)
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    path = tmp_path / "lora"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_model_against_itself_has_zero_kl_and_fixed_seed_repeats(tiny_model_dir, prompts):
    first = run(_config(str(tiny_model_dir), prompts, reference=str(tiny_model_dir)))
    assert first["samples"] == 15 and first["prompts"] == 5
    assert first["kl"] == 0.0
    assert -6.0 <= first["reward/mean"] <= 0.0  # −|words − 6| with at most 8 tokens
    assert 0.0 < first["distinct-2"] <= 1.0 and 1 <= first["response/length"] <= 8
    assert run(_config(str(tiny_model_dir), prompts, reference=str(tiny_model_dir))) == first
    # no reference and no adapter: no KL reported
    assert "kl" not in run(_config(str(tiny_model_dir), prompts))


def test_lora_kl_uses_the_base_and_equals_an_explicit_reference(tiny_model_dir, lora_dir, prompts):
    implicit = run(_config(str(lora_dir), prompts))  # the base under the disabled adapter
    explicit = run(_config(str(lora_dir), prompts, reference=str(tiny_model_dir)))
    assert implicit["kl"] > 0.01
    assert implicit["kl"] == pytest.approx(explicit["kl"], rel=1e-4)
    assert implicit["reward/mean"] == explicit["reward/mean"]


def test_batches_of_prompts_cover_every_sample(tiny_model_dir, prompts):
    """Sampling two prompts at a time (3 batches, the last one short) still scores all 15 samples."""
    metrics = run(_config(str(tiny_model_dir), prompts, prompts_per_step=2, reference=str(tiny_model_dir)))
    assert metrics["samples"] == 15 and metrics["kl"] == 0.0


def test_cli_writes_json(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "eval" / "metrics.json"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--data", prompts, "--reward", "length:6",
                 "--group-size", "2", "--max-new-tokens", "8", "--output", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["samples"] == 10 and saved["reward"] == "length:6" and "reward/mean" in saved


def test_output_json_and_samples_round_trip(tiny_model_dir, prompts, tmp_path):
    """--output X.json also writes X.samples.jsonl: one record per sample whose rewards and lengths average to
    the reported reward/mean and response/length."""
    out = tmp_path / "eval" / "base.json"
    metrics = run(_config(str(tiny_model_dir), prompts, output=str(out)))
    saved = json.loads(out.read_text())
    samples = [json.loads(line) for line in (tmp_path / "eval" / "base.samples.jsonl").read_text().splitlines()]
    assert saved["reward/mean"] == pytest.approx(metrics["reward/mean"])
    assert len(samples) == 5 * 3 and [s["prompt"] for s in samples[:3]] == ["Review number 0:"] * 3
    assert sum(s["reward"] for s in samples) / 15 == pytest.approx(metrics["reward/mean"], abs=1e-6)
    assert sum(s["length"] for s in samples) / 15 == pytest.approx(metrics["response/length"], abs=1e-6)


def test_kl_passes_multiply_by_packed_weights_on_both_sides(tiny_model_dir, lora_dir, prompts):
    """The evaluation's two no-grad passes run on packed weights (alignkit.packing) where the CPU can: every linear
    of both sides, the same products, so a policy equal to its reference keeps a KL of exactly 0; the log-probs
    equal the plain-weight passes' to rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alignkit import packing
    from alignkit.evaluate import policy_and_reference
    from alignkit.logprobs import LogprobModel
    from alignkit.online import batched_logprobs, prompts_of, rollout_and_score
    from alignkit.rewards import load_reward
    from alignkit.rollout import SamplingConfig

    if not packing.packs(torch.float32, torch.device("cpu")):
        pytest.skip("no oneDNN packed linear on this build")

    class Products(TorchDispatchMode):
        packed = plain = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            Products.packed += name == "_linear_pointwise"
            Products.plain += name in ("mm", "addmm")
            return func(*args, **(kwargs or {}))

    model, tokenizer = load_model(str(lora_dir), merge_adapter=False)
    rows = prompts_of(DataConfig(data=prompts, max_length=32), tokenizer)
    scored = rollout_and_score(model, tokenizer, rows, load_reward("length:6"), SamplingConfig(max_new_tokens=8), 3,
                               torch.Generator().manual_seed(0))
    both = policy_and_reference(model, "", 1.0, batch_size=64)
    with Products():
        policy, reference = both(scored.rollout)
    assert Products.plain == 0 and Products.packed > 0  # every product of both passes packed
    assert float((policy - reference).abs().max()) > 0.01  # the adapter moved the policy
    # plain weights: the same log-probs to rounding
    plain_policy = batched_logprobs(LogprobModel(model), scored.rollout, 1.0, 64, packing=True)
    torch.testing.assert_close(policy, plain_policy, atol=1e-5, rtol=1e-5)
    # a policy equal to its reference (the LoRA B matrices zero): exactly equal log-probs on packed weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    policy, reference = both(scored.rollout)
    assert torch.equal(policy, reference)


def test_kl_chunks_hold_about_4096_positions_between_16_and_64_rows():
    from types import SimpleNamespace

    from alignkit.evaluate import kl_chunk_rows

    def prompts(*lengths):
        return [SimpleNamespace(prompt_ids=[0] * n) for n in lengths]

    assert kl_chunk_rows(prompts(21, 18), 24) == 64  # the quick start: 45-token rows
    assert kl_chunk_rows(prompts(40), 24) == 64  # 4096 // 64
    assert kl_chunk_rows(prompts(100, 28), 28) == 32  # 4096 // 128
    assert kl_chunk_rows(prompts(300), 300) == 16  # long rows: never fewer than 16

