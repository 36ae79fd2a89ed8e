"""Hand-offs between stages (issue #8): what one stage writes, the next reads and starts from correctly.

- A LoRA stage started from an earlier LoRA stage's output (``sft --lora`` then ``dpo|kto|ppo|grpo|raft --lora``)
  has that output as its reference: policy == reference at step 0, for every trainer.
- A reward model is read at one place whichever path scores a completion: the same-tokenizer fast path (rollout
  ids), the text bridge (re-tokenised text) and ``alignkit rm``'s training examples.
- The chains sft --lora -> bon -> rm -> ppo (with that reward model) and sft --lora -> bon -> dpo run through the
  CLI, each stage reading the previous one's files, with a check at every hand-off.
- Batches reach the loss on the engine's device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from alignkit.cli import main

OPENINGS = ["The movie was", "I watched this film and", "Honestly, the plot", "The acting in this one",
            "My friends said the ending", "This director always", "The soundtrack", "After two hours I"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(*args) -> None:
    trainer = args[0] not in ("bon", "evaluate")
    assert main([str(a) for a in args] + (["--report-to", "none", "--no-progress"] if trainer else [])) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage-data")
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": o, "completion": " great fun, loved it."} for o in OPENINGS])
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": o} for o in OPENINGS])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": o, "chosen": " wonderful and warm.", "rejected": " dull."}
                                               for o in OPENINGS])
    unpaired = write_jsonl(root / "unpaired.jsonl", [{"prompt": o, "completion": c, "label": d} for o in OPENINGS
                                                      for c, d in ((" wonderful.", True), (" dull.", False))])
    return {"sft": sft, "prompts": prompts, "pairs": pairs, "unpaired": unpaired}


@pytest.fixture(scope="module")
def sft_lora(tiny_model_dir, data, tmp_path_factory) -> Path:
    """A real ``alignkit sft --lora`` output whose adapter has moved far from the base (lr 0.05)."""
    run = tmp_path_factory.mktemp("sft-lora")
    _cli("sft", "--model", tiny_model_dir, "--lora", "--lora-r", "4", "--data", data["sft"], "--output-dir", run,
         "--max-steps", "3", "--batch-size", "4", "--lr", "5e-2", "--max-length", "64", "--mixed-precision", "no")
    assert (run / "final" / "adapter_config.json").exists()
    return run


# ------------------------------------------------------------------------------------- LoRA on a LoRA stage
def test_loading_an_adapter_starts_from_it_and_a_fresh_adapter_chains(sft_lora, tiny_model_dir, tmp_path):
    """load_model(adapter) is the SFT model (merged); --lora adds a fresh adapter that records the SFT directory as
    its base, so a saved second-stage adapter loads back on top of the SFT model, not the raw base."""
    from alignkit.logprobs import token_logprobs
    from alignkit.models import LoraSettings, adapter_disabled, load_model

    ids = torch.tensor([[1, 504, 3158, 436, 2865, 30]])
    target = torch.ones_like(ids, dtype=torch.bool)
    target[:, 0] = False

    def logps(model):
        with torch.no_grad():
            return token_logprobs(model, ids, target)

    base = logps(load_model(str(tiny_model_dir))[0])
    sft = logps(load_model(str(sft_lora))[0])
    attached = load_model(str(sft_lora), merge_adapter=False)[0]
    torch.testing.assert_close(logps(attached), sft, atol=1e-5, rtol=0)
    with adapter_disabled(attached):
        torch.testing.assert_close(logps(attached), base)  # evaluate's implicit reference: the adapter's base
    assert (sft - base).abs().max() > 0.05  # the SFT adapter moved the model

    policy, tokenizer = load_model(str(sft_lora), lora=LoraSettings(r=4))
    torch.testing.assert_close(logps(policy), sft, atol=1e-5, rtol=0)
    with adapter_disabled(policy):  # the reference of a LoRA stage: its starting point, the SFT model
        torch.testing.assert_close(logps(policy), sft, atol=1e-5, rtol=0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    second = logps(policy)
    policy.save_pretrained(tmp_path / "dpo")
    tokenizer.save_pretrained(tmp_path / "dpo")
    config = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((sft_lora / "final").resolve())
    torch.testing.assert_close(logps(load_model(str(tmp_path / "dpo"))[0]), second, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_offline_reference_is_the_initial_policy(algo, sft_lora, data, tmp_path):
    """Held-out implicit rewards β·(log π − log π_ref) at step 0 are 0: the reference is the SFT model."""
    run = tmp_path / algo
    source = data["pairs"] if algo == "dpo" else data["unpaired"]
    _cli(algo, "--model", sft_lora, "--lora", "--lora-r", "4", "--data", source, "--eval-data", source,
         "--output-dir", run, "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--mixed-precision", "no")
    before = _metrics(run)[0]
    assert before["step"] == 0
    assert before["eval/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert before["eval/rewards/rejected"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "raft"])
def test_online_reference_is_the_initial_policy(algo, sft_lora, data, tmp_path):
    """The first rollout's KL to the reference is exactly 0: the fresh adapter starts at B = 0 on top of the SFT
    model, and the reference is that same model (the fresh adapter disabled), computed through the same forward."""
    run = tmp_path / algo
    _cli(algo, "--model", sft_lora, "--lora", "--lora-r", "4", "--data", data["prompts"], "--eval-data", "",
         "--output-dir", run, "--max-steps", "1", "--batch-size", "4", "--prompts-per-step", "4",
         "--group-size", "2" if algo != "ppo" else "1", "--max-new-tokens", "4", "--reward", "length:3",
         "--mixed-precision", "no", *(["--stages", "1"] if algo == "raft" else []),
         *(["--grad-accum", "1"] if algo == "ppo" else []))
    first = next(r for r in _metrics(run) if "kl" in r)
    assert first["kl"] == 0.0


# ------------------------------------------------------------------------------------------- bf16 path
@pytest.mark.parametrize("algo", ["grpo", "raft", "ppo"])
def test_zero_by_construction_is_exactly_zero_in_bf16(algo, tiny_model_dir, data, tmp_path, monkeypatch):
    """On a machine with native bf16 (--mixed-precision auto picks bf16; forced here so any CPU runs the path):
    the KL of an untrained policy to itself (full fine-tuning: a frozen copy), and PPO's first ratio π/π_old, are
    exactly 0 and 1, because both sides go through the same bf16 training forward, never the sampler's numbers."""
    monkeypatch.setenv("ALIGNKIT_BF16", "1")  # what bf16_is_fast() reports on a native-bf16 CPU
    run = tmp_path / algo
    _cli(algo, "--model", tiny_model_dir, "--data", data["prompts"], "--eval-data", "", "--output-dir", run,
         "--max-steps", "1", "--batch-size", "4", "--prompts-per-step", "4",
         "--group-size", "2" if algo != "ppo" else "1", "--max-new-tokens", "4", "--reward", "length:3",
         "--mixed-precision", "auto", *(["--stages", "1"] if algo == "raft" else []),
         *(["--grad-accum", "1", "--ppo-epochs", "1"] if algo == "ppo" else []))
    config = json.loads((run / "final" / "alignkit_config.json").read_text())
    assert config["train"]["mixed_precision"] == "auto"
    first = next(r for r in _metrics(run) if "kl" in r)
    assert first["kl"] == 0.0
    if algo == "ppo":  # one minibatch, one epoch: the only update is the first, where π = π_old exactly
        assert first["approx_kl"] == 0.0 and first["clipfrac"] == 0.0


def test_sampler_dtype_follows_the_same_detection(monkeypatch):
    from alignkit.engine import resolve_precision
    from alignkit.rollout import _resolve_dtype

    for forced, precision, dtype in (("1", "bf16", torch.bfloat16), ("0", "no", torch.float32)):
        monkeypatch.setenv("ALIGNKIT_BF16", forced)
        assert resolve_precision("auto") == precision
        assert _resolve_dtype("auto", torch.nn.Linear(1, 1), torch.device("cpu")) == dtype


# ------------------------------------------------------------------------------------ the reward-model rule
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("rule-rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_reads_one_final_token_on_every_path(tiny_rm):
    """Fast path (rollout ids) == text bridge (decoded text) == an ``alignkit rm`` training example, for chat
    prompts (rollouts stop at <|im_end|>; the template adds "\\n" after it) and plain text (training appends EOS,
    decoded text has none), and for a response cut at max_new_tokens (no EOS anywhere)."""
    from alignkit.algos import rm
    from alignkit.data import build_examples, load_records
    from alignkit.data.examples import encode_prompt
    from alignkit.rewards import RewardModelSource

    source = RewardModelSource(tiny_rm)
    tok = source.tokenizer
    eos = tok.eos_token_id
    chat = [{"role": "user", "content": "Describe the film."}]
    completion = "It was a warm, funny film."
    cases = [(chat, True), ("The movie was", True), ("The movie was", False)]  # False: cut, no EOS sampled
    for prompt, ended in cases:
        prompt_ids = encode_prompt(tok, prompt)  # what the sampler starts from
        response = tok(completion, add_special_tokens=False)["input_ids"] if isinstance(prompt, list) else \
            tok(" " + completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + response + ([eos] if ended else [])  # what a rollout holds
        text = completion if isinstance(prompt, list) else " " + completion  # what the policy decodes
        fast = source([prompt], [text], input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                      tokenizer=tok)
        bridge = source.score_texts([prompt], [text])
        assert torch.equal(fast, bridge), (prompt, fast, bridge)

        # the same text as a reward-model training example, scored by the training forward
        chat_turns = isinstance(prompt, list)
        record = {"prompt": prompt, **{k: [{"role": "assistant", "content": t}] if chat_turns else t
                                       for k, t in (("chosen", text), ("rejected", " no."))}}
        examples, _ = build_examples(load_records([record]), rm.rm_example, tok)
        example = examples[0]
        assert example.chosen_ids[-1] == eos and example.prompt_ids + example.chosen_ids == \
            (ids if ended else ids + [eos])
        batch = rm.collate_pairs(examples, tok.pad_token_id)
        with torch.no_grad():
            trained = rm._rewards(rm.ScoreModel(source.model), batch)[:1]
        torch.testing.assert_close(trained, fast, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- device
def test_every_loss_receives_its_batch_on_the_engine_device(tiny_model_dir, tmp_path):
    """Engine.update moves each micro-batch (dicts, nested dicts, a Rollout) to engine.device before the loss."""
    from alignkit.algos.grpo import Batch
    from alignkit.engine import Engine, TrainConfig
    from alignkit.models import load_model
    from alignkit.rollout import Rollout

    model, tokenizer = load_model(str(tiny_model_dir))
    engine = Engine(TrainConfig(output_dir=str(tmp_path), report_to="none", progress=False), model, tokenizer, 1)
    rollout = Rollout(*(torch.zeros(2, 3, dtype=torch.long) for _ in range(4)), torch.zeros(2, 3),
                      torch.zeros(2, dtype=torch.bool))
    seen = []

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            return [t for v in x.values() for t in tensors(v)]
        if isinstance(x, (Rollout, Batch)):
            return [t for v in vars(x).values() for t in tensors(v)]
        return []

    def loss_fn(module, batch):
        seen.extend(t.device for t in tensors(batch))
        return sum(p.sum() for p in module.parameters()) * 0.0, {}

    micro = [{"ids": torch.zeros(2), "nested": {"rollout": rollout}}, Batch(rollout, torch.zeros(2), None, None)]
    engine.update(micro, loss_fn, lambda b: 1)
    assert len(seen) == 2 + 6 + 6 and all(d == engine.device for d in seen)


# ---------------------------------------------------------------------------------------------- the chains
def test_chain_sft_bon_rm_ppo(sft_lora, data, tmp_path):
    """sft --lora -> bon -> rm (on bon's pairs, from the SFT model) -> ppo --lora with that reward model."""
    from alignkit.data import preference_example, ranked_example, read_examples
    from alignkit.models import load_tokenizer
    from alignkit.rewards import RewardModelSource

    bon = tmp_path / "bon"
    _cli("bon", "--model", sft_lora, "--data", data["prompts"], "--output-dir", bon, "--group-size", "4",
         "--max-new-tokens", "6", "--reward", "length:3", "--max-length", "64")
    tokenizer = load_tokenizer(str(sft_lora))
    pairs = read_examples(str(bon / "pairs.jsonl"), preference_example, tokenizer, 64)  # hand-off 1: files parse
    ranked = read_examples(str(bon / "bon.jsonl"), ranked_example, tokenizer, 64)
    assert len(ranked) == len(OPENINGS) and len(pairs) >= 4

    rm_run = tmp_path / "rm"
    _cli("rm", "--model", sft_lora, "--data", bon / "pairs.jsonl", "--output-dir", rm_run, "--max-steps", "2",
         "--batch-size", "2", "--lr", "1e-3", "--max-length", "64", "--mixed-precision", "no")
    # hand-off 2: the reward model scores a bon completion the same through ids and through text
    source = RewardModelSource(str(rm_run))
    record = json.loads((bon / "bon.jsonl").read_text().splitlines()[0])
    ids = tokenizer(record["prompt"])["input_ids"] + tokenizer(record["responses"][0], add_special_tokens=False)["input_ids"]
    fast = source([record["prompt"]], [record["responses"][0]], input_ids=torch.tensor([ids]),
                  attention_mask=torch.ones(1, len(ids)), tokenizer=tokenizer)
    torch.testing.assert_close(fast, source.score_texts([record["prompt"]], [record["responses"][0]]))

    ppo_run = tmp_path / "ppo"
    _cli("ppo", "--model", sft_lora, "--lora", "--lora-r", "4", "--data", data["prompts"], "--eval-data", "",
         "--reward", rm_run, "--output-dir", ppo_run, "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1",
         "--prompts-per-step", "4", "--max-new-tokens", "4", "--lr", "1e-2", "--mixed-precision", "no")
    rows = [r for r in _metrics(ppo_run) if "kl" in r]
    assert rows[0]["kl"] == 0.0  # hand-off 3: the reference is the SFT model, the policy's starting point
    assert rows[1]["kl"] != 0.0  # ... and the policy moved away from it
    assert all(abs(r["score/mean"]) < 100 for r in rows)  # scored by the trained reward model


def test_chain_sft_bon_dpo(sft_lora, data, tmp_path, capsys):
    """sft --lora -> bon -> dpo --lora on bon's pairs: margins start at exactly the reference's (0) and grow.

    DPO takes all 8 pairs per step: the pairs are random-model samples, so batches of 2 at lr 5e-2 pull against
    each other and the held-out margin after 3 steps swung between -0.04 and 0.15 with the seed and the sampler's
    precision; full-batch steps at lr 2e-2 ended at 0.15-0.20 (seeds 1, 2, 3, 42; fp32 and bf16 sampling)."""
    bon = tmp_path / "bon"
    _cli("bon", "--model", sft_lora, "--data", data["prompts"], "--output-dir", bon, "--group-size", "4",
         "--max-new-tokens", "6", "--reward", "length:3", "--max-length", "64")
    dpo = tmp_path / "dpo"
    _cli("dpo", "--model", sft_lora, "--lora", "--lora-r", "4", "--data", bon / "pairs.jsonl", "--eval-data",
         bon / "pairs.jsonl", "--output-dir", dpo, "--max-steps", "4", "--batch-size", "8", "--lr", "2e-2",
         "--max-length", "64", "--mixed-precision", "no")
    rows = [r for r in _metrics(dpo) if "eval/rewards/margins" in r]
    assert rows[0]["step"] == 0 and rows[0]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["eval/rewards/margins"] > 0.05 and rows[-1]["eval/rewards/accuracies"] >= 0.75
    printed = capsys.readouterr().out.splitlines()  # the held-out metrics of the first and last rows, as logged
    for when, row in (("before", rows[0]), ("after", rows[-1])):
        assert f"held-out {when}: ".ljust(17) + f"eval/loss {row['eval/loss']:.4f}, eval/rewards/accuracies " \
            f"{row['eval/rewards/accuracies']:.4f}" in printed
    assert f"model saved to {dpo / 'final'}" in printed


def test_dpo_forced_bf16_learns_and_starts_at_zero_margin(tiny_model_dir, data, tmp_path):
    """--mixed-precision bf16 on any CPU (emulated where the CPU lacks it; fine for a tiny model): the step-0
    implicit rewards are 0 to bf16 precision (reference and policy batches are padded differently, so not bit-equal)
    and the held-out margin grows."""
    run = tmp_path / "dpo-bf16"
    _cli("dpo", "--model", tiny_model_dir, "--lora", "--lora-r", "4", "--data", data["pairs"], "--eval-data",
         data["pairs"], "--output-dir", run, "--max-steps", "4", "--batch-size", "4", "--lr", "5e-2",
         "--max-length", "64", "--mixed-precision", "bf16")
    rows = [r for r in _metrics(run) if "eval/rewards/margins" in r]
    assert rows[0]["step"] == 0 and abs(rows[0]["eval/rewards/margins"]) < 0.02
    assert rows[-1]["eval/rewards/margins"] > rows[0]["eval/rewards/margins"] + 0.05
