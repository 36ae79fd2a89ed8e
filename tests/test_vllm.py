"""``--generator vllm``: a colocated vLLM engine fed the policy's weights (alignkit.generation.vllm).

The engine tests need vLLM, which lives in its own environment (``make test-vllm`` builds .venv-vllm and runs this
file there); elsewhere they are skipped with the reason. Each engine start takes ~30-60 s on 2 shared cores
(enforce_eager: no graph compilation), so the SmolLM2 engine is shared by the module's tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from alignkit.cli import main
from alignkit.generation.vllm import vllm_problem

VLLM_MISSING = vllm_problem()
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=f"`make test-vllm` runs these: {VLLM_MISSING}")

WORDS = [" great", " good", " fine", " bad", " ok", " nice", " poor", " cool"]  # one token each, a space before


# ------------------------------------------------------------------------------------ option checks (any env)
def test_trainers_refuse_an_endpoint_generator(tmp_path, capsys):
    """The policy of an online trainer changes after every update: an endpoint (a fixed model) is refused at the
    option check, in one line naming the flag."""
    assert main(["grpo", "--generator", "http://127.0.0.1:9/v1", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--generator" in err[0] and "expected builtin or vllm" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(VLLM_MISSING is None, reason="vLLM is importable here")
def test_vllm_generator_without_vllm_is_one_line(tmp_path, capsys):
    assert main(["bon", "--data", "bundled:movie_prompts_test", "--generator", "vllm",
                 "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--generator" in err[0] and "make .venv-vllm" in err[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ the engine (SmolLM2)
@pytest.fixture(scope="module")
def smollm():
    """SmolLM2-135M (tied embeddings) and one engine over it, for the module's tests."""
    from alignkit.generation.vllm import VLLMSampler
    from alignkit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    sampler = VLLMSampler(model, tokenizer, max_model_len=256, seed=0, follow_updates=True)
    yield model, tokenizer, sampler
    sampler.close()


def movie_prompts(tokenizer, n: int) -> list:
    from alignkit.online import read_prompts

    return read_prompts("bundled:movie_prompts_test", tokenizer, 128)[:n]


def greedy_both(model, tokenizer, sampler, prompts, new_tokens: int = 16):
    from alignkit.rollout import SamplingConfig, sample

    config = SamplingConfig(max_new_tokens=new_tokens, greedy=True, dtype="fp32")
    ids = [p.prompt_ids for p in prompts]
    return sample(model, ids, config, tokenizer=tokenizer), sampler(ids, config, torch.Generator().manual_seed(0))


def responses(rollout) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]


@needs_vllm
def test_pushed_weights_move_vllm_exactly_as_the_policy(smollm):
    """Greedy decoding is deterministic, so after every change of the policy vLLM's greedy responses must equal the
    builtin sampler's on the changed policy, token for token (fp32 both), with the same per-token log-probs up to
    kernel rounding: (1) the initial weights, pushed into a dummy-initialised engine; (2) after a real SGD step
    (the full weights change); (3) under a LoRA adapter with non-zero B (pushed merged, W + BA). Each change must
    also change the responses, so a push that silently did nothing would fail."""
    from alignkit.models import LoraSettings, add_lora

    model, tokenizer, sampler = smollm
    prompts = movie_prompts(tokenizer, 6)
    seen = []
    for stage in ("initial", "sgd", "lora"):
        if stage == "sgd":
            # one step of plain SGD on the LM loss of an unrelated text: every weight moves
            batch = tokenizer(["Terrible, boring, awful. I hated every minute of it."] * 2, return_tensors="pt")
            model.train()
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
                    p.grad = None
            model.eval()
        elif stage == "lora":
            model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(1)
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
            sampler.model = model
        builtin, vllm = greedy_both(model, tokenizer, sampler, prompts)
        assert responses(vllm) == responses(builtin), stage
        mask = builtin.response_mask.bool()
        assert torch.allclose(vllm.logprobs[mask], builtin.logprobs[mask], atol=2e-3), stage
        assert torch.equal(vllm.ended_with_eos, builtin.ended_with_eos)
        seen.append(responses(vllm))
    assert seen[0] != seen[1] and seen[1] != seen[2]


@needs_vllm
def test_sampled_rewards_and_lengths_match_the_builtin_sampler(smollm):
    """Same prompts, same sampling settings (temperature 0.7, top-p 0.9: both must be applied alike), VADER
    reward: the two back ends draw from the same distribution, with different random streams. n = 96 samples
    each (24 prompts x 4); the means must agree within 4 standard errors of their difference,
    4·sqrt(s_a²/n + s_b²/n) (a two-sample z-test; a false alarm has probability ~6e-5). VADER's compound score
    has s ≈ 0.3-0.5 here, so rewards must agree within ~0.2; lengths within ~2-3 tokens of 32."""
    from alignkit.generation.vllm import VLLMSampler  # noqa: F401  (the engine comes from the fixture)
    from alignkit.online import rollout_and_score
    from alignkit.rewards import load_reward
    from alignkit.rollout import SamplingConfig

    model, tokenizer, sampler = smollm
    from alignkit.models import load_model

    model, _ = load_model("smollm2-135m")  # the fixture's model may have been changed by another test
    sampler.model = model
    prompts = movie_prompts(tokenizer, 24)
    reward = load_reward("vader")
    config = SamplingConfig(max_new_tokens=32, temperature=0.7, top_p=0.9, dtype="fp32")
    stats = {}
    for name, use in (("builtin", None), ("vllm", sampler)):
        scored = rollout_and_score(model, tokenizer, prompts, reward, config, 4, torch.Generator().manual_seed(3), use)
        lengths = scored.rollout.response_mask.sum(-1).float()
        stats[name] = (scored.rewards, lengths)
    n = 96
    for i, what in enumerate(("reward", "length")):
        a, b = stats["builtin"][i], stats["vllm"][i]
        assert a.numel() == b.numel() == n
        bound = 4 * math.sqrt(float(a.var()) / n + float(b.var()) / n)
        print(f"{what}: builtin {float(a.mean()):.3f} ± {float(a.std()):.3f}, vllm {float(b.mean()):.3f} ± "
              f"{float(b.std()):.3f}, |diff| {abs(float(a.mean() - b.mean())):.3f} <= {bound:.3f}")
        assert abs(float(a.mean() - b.mean())) <= bound, what
    # different streams: the back ends do not return the same samples
    assert not torch.equal(stats["builtin"][0], stats["vllm"][0])


# ------------------------------------------------------------------------------------ a GRPO run (tiny model)
def great_fraction(completion: str) -> float:
    words = completion.split()
    return sum(w == "great" for w in words) / max(1, len(words))


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory) -> Path:
    """A tiny llama (SmolLM2 vocabulary, head_dim 64: vLLM's CPU attention has no kernel for 16) that samples
    mostly one of 8 words (as in tests/test_grpo.py): every input embedding carries 3.0 in dimension 0, which
    dominates the final RMSNorm's output; the untied LM head reads only it, with weight 1.0 for the 8 words and 0
    elsewhere (measured: nearly every sampled token is one of the words, each ~1/8)."""
    from alignkit.models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=256)
    model.config.tie_word_embeddings = False
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(model.config)
    ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in WORDS]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids, 0] = 1.0
    path = tmp_path_factory.mktemp("peaked-llama-256")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@needs_vllm
def test_grpo_with_vllm_learns_the_rewarded_word(peaked_model_dir, tmp_path):
    """tests/test_grpo.py's learning task, sampled by vLLM: the held-out reward (sampled by vLLM too) must rise well
    above where it started, and so must the rollouts' reward, which only happens when every update reaches the
    engine (a stale engine keeps sampling the initial policy: ~0.1). The KL at the first step is exactly 0: vLLM's
    tokens go through the training forward for both the policy and the reference, as with the builtin sampler."""
    root = tmp_path / "prompts"
    root.mkdir()
    train = write_jsonl(root / "train.jsonl", [{"prompt": f"Review number {i}:"} for i in range(16)])
    test = write_jsonl(root / "test.jsonl", [{"prompt": f"Held-out review {i}:"} for i in range(8)])
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(peaked_model_dir), "--data", str(train), "--eval-data", str(test),
                 "--max-length", "64", "--generator", "vllm", "--reward", "test_vllm:great_fraction",
                 "--output-dir", str(out), "--lr", "7e-3", "--batch-size", "16", "--grad-accum", "2",
                 "--max-steps", "7", "--schedule", "constant", "--report-to", "none", "--no-progress",
                 "--prompts-per-step", "8", "--group-size", "4", "--max-new-tokens", "6", "--eval-prompts", "8",
                 "--beta", "0.04"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0]["eval/reward/mean"], rows[-1]["eval/reward/mean"]
    steps = [r for r in rows if "reward/mean" in r]
    print("held-out", before, "->", after, "rollouts", [round(r["reward/mean"], 3) for r in steps])
    assert before < 0.2 and after > before + 0.15
    assert len(steps) == 7 and (steps[-1]["reward/mean"] + steps[-2]["reward/mean"]) / 2 > \
        (steps[0]["reward/mean"] + steps[1]["reward/mean"]) / 2 + 0.05
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0
    assert steps[0]["response/length"] == 6
    assert (out / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ --generator http://... (any env)
@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """``alignkit serve``'s app over the tiny model, on loopback."""
    from conftest import serving

    from alignkit.models import load_model
    from alignkit.serve import ServeConfig, create_app

    model, tokenizer = load_model(str(tiny_model_dir))
    with serving(create_app(model, tokenizer, ServeConfig(model="tiny", dtype="fp32"))) as url:
        yield url + "/v1"


def test_evaluate_through_an_endpoint(served, tiny_model_dir, tmp_path):
    """evaluate --generator http://...: every sample comes back from the server, and the metrics are those of the
    written samples (round trip): mean reward, length counted in the model's tokens, as many samples as asked."""
    from alignkit.models import load_tokenizer
    from alignkit.rewards import load_reward

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--generator", served + "|tiny", "--max-prompts", "3",
                 "--group-size", "2", "--max-new-tokens", "6", "--reward", "length:6", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    samples = [json.loads(line) for line in (tmp_path / "eval.samples.jsonl").read_text().splitlines()]
    assert metrics["samples"] == len(samples) == 6 and metrics["prompts"] == 3
    tokenizer = load_tokenizer(str(tiny_model_dir))
    lengths = [len(tokenizer(s["completion"], add_special_tokens=False)["input_ids"]) for s in samples]
    assert all(0 < n <= 7 for n in lengths)  # 6 tokens, re-tokenised text may merge or split one
    assert metrics["response/length"] == pytest.approx(sum(lengths) / 6)
    rewards = load_reward("length:6")([s["prompt"] for s in samples], [s["completion"] for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx(rewards.tolist())
    assert metrics["reward/mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert "kl" not in metrics and "response/no_eos" not in metrics


def test_critique_through_generator_endpoint(served, tiny_model_dir, tmp_path):
    out = tmp_path / "cai"
    assert main(["critique", "--model", str(tiny_model_dir), "--generator", served + "|tiny", "--data",
                 "bundled:instructions_test", "--max-prompts", "2", "--max-new-tokens", "5", "--temperature", "0",
                 "--output-dir", str(out)]) == 0
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 2 and all(len(c["rounds"]) == 1 for c in chains)
    assert (out / "sft.jsonl").exists() and (out / "summary.json").exists()


def test_critique_endpoint_and_generator_conflict_is_one_line(tmp_path, capsys):
    assert main(["critique", "--endpoint", "http://127.0.0.1:9/v1", "--generator", "http://127.0.0.1:9/v1",
                 "--data", "bundled:instructions_test", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--endpoint" in err[0] and "--generator" in err[0]
