"""Padding-free layouts (``pack_prompt_groups``): a prompt once, its answers after it, several groups per row
behind a block mask. Every number must equal the padded forward's: per-answer log-probs and their gradients (DPO),
rewards and their gradients (RM), and whole training runs."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from conftest import write_jsonl

from alignkit.algos import dpo, rm
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import PreferenceExample
from alignkit.data.collate import PAIR_COST, pack_prompt_groups, plan_rows
from alignkit.engine import TrainConfig
from alignkit.logprobs import LogprobModel, token_logprobs
from alignkit.models import tiny_causal_lm


def test_layout_by_hand():
    """Prompt [11, 12] with answers [13] and [14, 15], then an empty prompt with answer [16, 17]: positions,
    who predicts whom (the prompt's last token predicts both answers' first tokens; nothing predicts the first
    token after an empty prompt) and what each token sees."""
    batch = pack_prompt_groups([([11, 12], [[13], [14, 15]]), ([], [[16, 17]])], pad_id=0, pair_cost=0.0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 16, 17]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1]]
    assert batch["last"].tolist() == [2, 4, 6]
    assert batch["target_index"].tolist() == [2, 3, 4, 6]
    assert batch["source_index"].tolist() == [1, 1, 3, 5]
    assert batch["response_index"].tolist() == [0, 1, 1, 2]
    assert batch["lengths"].tolist() == [1, 2, 2]
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],  # the second answer sees the prompt, not the first answer
        [1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # another group: nothing of the first
        [0, 0, 0, 0, 0, 1, 1],
    ]
    # without sharing, each answer carries its own prompt copy: units of 3, 4 and 2 tokens; at 0.1 per attention
    # pair two rows (4 | 3 + 2) cost 2·5·1.5 = 15 against one row's 9·1.9 = 17.1 and three rows' 3·4·1.4 = 16.8
    plain = pack_prompt_groups([([11, 12], [[13], [14, 15]]), ([], [[16, 17]])], pad_id=0, share_prompt=False,
                               pair_cost=0.1)
    assert plain["input_ids"].shape == (2, 5)
    assert sorted(plain["lengths"].tolist()) == [1, 2, 2]


def _examples(n: int, seed: int) -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(5, 1000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    examples = [PreferenceExample(ids(1, 12), ids(1, 9), ids(1, 9)) for _ in range(n)]
    examples[1].prompt_ids = []  # an implicit-prompt pair: nothing to share, nothing predicts its first token
    return examples


def _pair_run(model, batch, weights):
    model.zero_grad()
    logps, lengths = dpo.pair_logps(LogprobModel(model), batch)
    (logps * weights).sum().backward()
    return logps.detach(), lengths, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pair_cost", [PAIR_COST, 0.2])  # one row; many rows
def test_dpo_packed_logprobs_and_gradients_equal_the_padded_forward(pair_cost):
    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    model.eval()
    items = [(e, 0.0, 0.0) for e in _examples(7, seed=int(pair_cost * 1000))]
    weights = torch.randn(14)
    padded = _pair_run(model, dpo.collate_pairs(items, pad_id=0), weights)
    batch = dpo.collate_pairs(items, pad_id=0, pack=True, pair_cost=pair_cost)
    assert (batch["input_ids"].shape[0] == 1) == (pair_cost == PAIR_COST)
    longest = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e, _, _ in items)
    assert batch["input_ids"].numel() < 14 * longest  # fewer positions than the padded rows
    packed = _pair_run(model, batch, weights)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert packed[1].tolist() == padded[1].tolist()
    assert packed[2].keys() == padded[2].keys() and padded[2]
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unshared_packing_equals_padded_token_logprobs():
    """Plain sequence packing (every answer with its own prompt copy) gives the same token log-probs too."""
    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    examples = _examples(5, seed=3)
    groups = [(e.prompt_ids, [e.chosen_ids, e.rejected_ids]) for e in examples]
    batch = pack_prompt_groups(groups, pad_id=0, share_prompt=False, pair_cost=0.05)
    assert batch["input_ids"].shape[0] > 1
    with torch.no_grad():
        got = token_logprobs(model, batch["input_ids"], None, batch["attention_mask"], batch["position_ids"],
                             at=(batch["target_index"], batch["source_index"]))
        sums = torch.zeros(10).index_add(0, batch["response_index"], got)
        items = [(e, 0.0, 0.0) for e in examples]
        want, _ = dpo.pair_logps(LogprobModel(model), dpo.collate_pairs(items, pad_id=0))
    # pack_prompt_groups numbers (c0, r0, c1, ...); collate_pairs's padded order is (c0, c1, ..., r0, r1, ...)
    torch.testing.assert_close(sums.view(5, 2).t().reshape(-1), want, atol=1e-5, rtol=0)


def test_dpo_packed_under_bf16_autocast_equals_padded_to_bf16_precision():
    """The native-bf16 path (forced here: emulated, slow, so a tiny batch): the packed forward under bf16 autocast
    equals the padded one under the same autocast to bf16 rounding, values and gradients."""
    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    items = [(e, 0.0, 0.0) for e in _examples(4, seed=5)]
    weights = torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = _pair_run(model, dpo.collate_pairs(items, pad_id=0), weights)
        packed = _pair_run(model, dpo.collate_pairs(items, pad_id=0, pack=True), weights)
    exact = _pair_run(model, dpo.collate_pairs(items, pad_id=0, pack=True), weights)
    assert not torch.equal(packed[0], exact[0])  # bf16 really ran
    # summed over up to 8 tokens of ~11 nats each: bf16's ~3 significant digits
    torch.testing.assert_close(packed[0], padded[0], atol=0.1, rtol=1e-2)
    for name, grad in padded[2].items():  # bf16 rounds to 2^-8 relative: gradients agree to ~0.5% in norm
        assert (packed[2][name] - grad).norm() <= 2e-2 * grad.norm(), name


def test_rm_packed_rewards_and_gradients_equal_the_padded_forward():
    """The reward model reads its score at each answer's last token (the reward_input_ids position): rewards,
    loss and gradients of the packed batch equal the padded batch's."""
    from transformers import LlamaForSequenceClassification

    lm, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1})).eval()
    model.config.pad_token_id = 0
    examples = [e for e in _examples(6, seed=7) if e.prompt_ids]
    module = rm.ScoreModel(model)

    def run(pack):
        model.zero_grad()
        loss, _ = rm.pairwise_loss(module, rm.collate_pairs(examples, pad_id=0, pack=pack))
        loss.backward()
        with torch.no_grad():
            rewards = rm._rewards(module, rm.collate_pairs(examples, pad_id=0, pack=pack))
        return rewards, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded, packed = run(False), run(True)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1], padded[1], atol=1e-5, rtol=0)
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_training_with_and_without_packing_logs_the_same_losses(tiny_model_dir, tmp_path):
    """Through the trainer (precomputed reference, held-out evaluation, 4 steps): --packing and --no-packing log
    the same losses and rewards step by step."""
    rows = [{"prompt": f"Review {i}:" + " so" * (i % 5), "chosen": " good" * (1 + i % 3) + ".",
             "rejected": " bad" * (1 + i % 4) + "."} for i in range(24)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def run(packing: bool) -> list[dict]:
        out = tmp_path / f"run-{packing}"
        dpo.train(dpo.DPOConfig(
            model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=str(data), eval_data=str(data)),
            train=TrainConfig(output_dir=str(out), max_steps=4, batch_size=6, lr=1e-3, mixed_precision="no",
                              report_to="none", progress=False), packing=packing))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    packed, padded = run(True), run(False)
    keys = {k for row in padded for k in row if k.startswith(("loss", "eval/loss", "rewards", "eval/rewards"))}
    pairs = [(a, b) for a, b in zip(packed, padded, strict=True) if any(k in b for k in keys)]
    assert len(pairs) >= 3 and "loss" in keys and "eval/loss" in keys
    for a, b in pairs:
        for k in keys:
            if k in b:
                assert a[k] == pytest.approx(b[k], abs=2e-4), (k, a, b)


def test_plan_rows_picks_the_cheapest_row_count_by_hand():
    """Units of 30, 17, 12, 9 and 4 tokens, cost k·L·(1 + c·L): without attention cost one row (72 positions); at
    c = 0.02 two rows, 30 + 4 | 17 + 12 + 9 (L = 38: 76·1.76 = 133.8, against one row's 72·2.44 = 175.7 and three
    rows' 90·1.6 = 144); at c = 1 three rows, 30 | 17 + 4 | 12 + 9 (L = 30: 2,790, against two rows' 2,964)."""
    sizes = [30, 17, 12, 9, 4]
    assert plan_rows(sizes, 0.0) == ([[0, 1, 2, 3, 4]], 72)
    assert plan_rows(sizes, 0.02) == ([[0, 4], [1, 2, 3]], 38)
    assert plan_rows(sizes, 1.0) == ([[0], [1, 4], [2, 3]], 30)
    assert plan_rows([], 1.0) == ([[]], 0)
    # the bundled model's own price: SFT micro-batches of 8 conversations of 50-150 tokens go in 3-5 rows
    rows, length = plan_rows([61, 78, 103, 93, 72, 90, 73, 90], PAIR_COST)
    assert len(rows) == 4 and length == 168


@pytest.mark.parametrize("pair_cost", [PAIR_COST, 1.0])  # one row; three rows
def test_sft_padding_free_loss_and_gradients_equal_the_padded_batch(pair_cost):
    """SFT's default layout (the micro-batch's own examples in shared rows, positions restarting) gives the padded
    batch's summed NLL and gradients."""
    from alignkit.algos import sft
    from alignkit.data import SFTExample
    from alignkit.data.collate import collate_padding_free, pad_sft

    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    g = torch.Generator().manual_seed(11)
    examples = []
    for n in (9, 30, 4, 17, 12):
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        examples.append(SFTExample(ids, [-100] * (n // 3) + ids[n // 3:]))

    def run(batch):
        model.zero_grad()
        loss, _ = sft.sft_loss(LogprobModel(model), batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded_batch, free_batch = pad_sft(examples, 0), collate_padding_free(examples, 0, pair_cost)
    assert free_batch["input_ids"].shape == ((1, 72) if pair_cost == PAIR_COST else (3, 30))
    assert free_batch["input_ids"].numel() < padded_batch["input_ids"].numel()
    assert sft.count_targets(free_batch) == sft.count_targets(padded_batch)
    padded, free = run(padded_batch), run(free_batch)
    torch.testing.assert_close(free[0], padded[0], atol=1e-4, rtol=1e-6)
    held_out = [sft.mean_nll(LogprobModel(model), [batch], nullcontext) for batch in (padded_batch, free_batch)]
    assert held_out[0] == pytest.approx(held_out[1], abs=1e-5)  # the held-out loss takes either layout
    for name, grad in padded[1].items():
        torch.testing.assert_close(free[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _rollout(seed: int):
    """Three prompts (two tokens to seven), groups of 3, 1 and 2 responses of 1 to 9 tokens, prompts left-padded
    and responses right-padded as the sampler returns them."""
    from alignkit.rollout import Rollout

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, 1000, (n,), generator=g).tolist()

    prompts = [ids(7), ids(2), ids(4)]
    rows = [(prompts[0], ids(9)), (prompts[0], ids(1)), (prompts[0], ids(5)), (prompts[1], ids(3)),
            (prompts[2], ids(8)), (prompts[2], ids(2))]
    width, longest = max(len(p) for p, _ in rows), max(len(r) for _, r in rows)
    prompt_ids, prompt_mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    response_ids, response_mask = torch.zeros(len(rows), longest, dtype=torch.long), torch.zeros(len(rows), longest, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        prompt_ids[i, width - len(p):], prompt_mask[i, width - len(p):] = torch.tensor(p), 1
        response_ids[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(r), 1
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(len(rows), longest),
                   torch.zeros(len(rows), dtype=torch.bool))


def test_rollout_packed_logprobs_and_gradients_equal_the_padded_forward():
    """GRPO's log-prob passes (``online.response_logprobs``): the padding-free layout gives the padded layout's
    per-token log-probs (0 on padding) and gradients, at a sampling temperature; the groups are found from the
    rows, and shuffled rows (no two neighbours sharing a prompt) work too."""
    from alignkit.online import packed_rollout, response_logprobs, rollout_groups, rows

    model, _ = tiny_causal_lm(num_layers=2, hidden_size=64)
    rollout = _rollout(seed=0)
    assert [(len(p), [len(r) for r in rs]) for p, rs in rollout_groups(rollout)] == [(7, [9, 1, 5]), (2, [3]), (4, [8, 2])]
    # short responses beside long ones: packing is cheaper; groups of 22, 5 and 14 tokens in two rows (22 | 14 + 5)
    assert packed_rollout(rollout, model.config)["input_ids"].shape == (2, 22)
    weights = torch.randn(rollout.response_ids.shape)

    def run(part, packing):
        model.zero_grad()
        logps = response_logprobs(LogprobModel(model), part, temperature=0.7, packing=packing)
        (logps * weights[: logps.shape[0], : logps.shape[1]]).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for part in (rollout, rows(rollout, torch.tensor([4, 0, 3, 1]))):
        assert packed_rollout(part, model.config) is not None
        padded, packed = run(part, False), run(part, True)
        assert packed[0].shape == part.response_ids.shape
        assert (packed[0][part.response_mask == 0] == 0).all() and (packed[0][part.response_mask == 1] < 0).all()
        torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
        assert padded[1] and packed[1].keys() == padded[1].keys()
        for name, grad in padded[1].items():
            torch.testing.assert_close(packed[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grpo_steps_with_and_without_packing_agree(tiny_model_dir, tmp_path):
    """Two GRPO updates (two minibatches per rollout, so the old log-probs are recomputed; reference pass; KL in
    the loss) on a rollout whose responses end at different lengths: --packing and --no-packing log the same
    losses, KLs and gradient norms and leave the same weights; before the first update the KL is exactly 0."""
    from alignkit.algos.grpo import GRPOConfig, grpo_step, make_advantage_fn
    from alignkit.engine import Engine
    from alignkit.models import load_model
    from alignkit.online import batched_logprobs, packed_rollout

    rollout = _rollout(seed=1)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 1.0])
    config = load_model(str(tiny_model_dir))[0].config
    assert packed_rollout(rollout, config) is not None and packed_rollout(rollout.to("cpu"), config) is not None

    def run(packing: bool):
        model, _ = load_model(str(tiny_model_dir))
        cfg = GRPOConfig(train=TrainConfig(output_dir=str(tmp_path / str(packing)), lr=1e-2, batch_size=3, grad_accum=1,
                                           mixed_precision="no", report_to="none", progress=False),
                         advantage="reinforce++", kl_in="loss", packing=packing)
        engine = Engine(cfg.train, model, None, 10, train_module=LogprobModel(model))
        ref = LogprobModel(load_model(str(tiny_model_dir))[0])
        logs = [grpo_step(engine, lambda r: batched_logprobs(ref, r, 1.0, 3, packing=packing), rollout, scores, cfg,
                          make_advantage_fn(cfg)) for _ in range(2)]
        return logs, {k: v.clone() for k, v in model.state_dict().items()}

    (packed, packed_weights), (padded, padded_weights) = run(True), run(False)
    assert packed[0]["kl"] == 0.0 and padded[0]["kl"] == 0.0 and padded[1]["kl"] != 0.0
    for a, b in zip(packed, padded, strict=True):
        assert a.keys() == b.keys()
        for k in ("loss", "kl", "kl_k3", "grad_norm", "ratio", "clipfrac"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    initial = load_model(str(tiny_model_dir))[0].state_dict()
    for k, v in padded_weights.items():  # the same updates, up to Adam's rescaling of rounding-level gradients
        moved, apart = (v - initial[k]).norm(), (packed_weights[k] - v).norm()
        assert moved > 0 and apart <= 1e-3 * moved, k


def test_rollout_layout_is_chosen_by_its_estimated_cost():
    """SmolLM2's shapes: 16 prompts x 4 responses that all reach a 32-token cap stay padded (the padded layout has
    no padding to remove, and packing would triple the attention pairs); responses of 1..128 tokens pack."""
    from transformers import LlamaConfig

    from alignkit.online import packed_rollout
    from alignkit.rollout import Rollout

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    g = torch.Generator().manual_seed(0)

    def rollout(lengths: list[int]) -> Rollout:
        prompts = torch.randint(5, 1000, (16, 14), generator=g).repeat_interleave(4, 0)
        width = max(lengths)
        mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        return Rollout(prompts, torch.ones_like(prompts), torch.randint(5, 1000, (64, width), generator=g) * mask,
                       mask, torch.zeros(64, width), torch.zeros(64, dtype=torch.bool))

    assert packed_rollout(rollout([32] * 64), config) is None
    spread = packed_rollout(rollout(torch.randint(1, 129, (64,), generator=g).tolist()), config)
    assert spread is not None and spread["input_ids"].numel() < 64 * 128


def test_ppo_updates_with_and_without_packing_agree(tiny_model_dir, tmp_path):
    """PPO's passes (old log-probs, values and entropies; reference; two epochs of minibatch updates with the value
    head) on a rollout whose responses end at different lengths: --packing and --no-packing log the same numbers
    and leave the same policy and value head; the KL of the first rollout is exactly 0 in both layouts."""
    from alignkit.algos import ppo
    from alignkit.engine import Engine
    from alignkit.models import load_model
    from alignkit.online import packed_rollout, reference_logprobs

    rollout = _rollout(seed=2)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 1.0])

    def run(packing: bool):
        model, _ = load_model(str(tiny_model_dir))
        assert packed_rollout(rollout, model.config) is not None
        cfg = ppo.PPOConfig(train=TrainConfig(output_dir=str(tmp_path / str(packing)), lr=1e-2, batch_size=3,
                                              grad_accum=1, mixed_precision="no", report_to="none", progress=False),
                            ppo_epochs=2, packing=packing)
        torch.manual_seed(0)
        head = torch.nn.Linear(model.config.hidden_size, 1)  # not zero: values that differ per token
        module = ppo.PolicyValueModel(model, head).eval()
        engine = Engine(cfg.train, model, None, 10, train_module=module, extra_modules={"value_head": head})
        ref_fn = reference_logprobs(model, False, "", 1.0, 3, engine.autocast, packing=packing)
        logs = [ppo.ppo_update(engine, module, ref_fn, rollout, scores, cfg, 0.1) for _ in range(2)]
        return logs, {k: v.clone() for k, v in module.state_dict().items()}, module

    (packed, packed_weights, module), (padded, padded_weights, _) = run(True), run(False)
    # padded, PPO's own pass shares each prompt through a KV cache as the reference's does, so exactly 0 there too
    assert packed[0]["kl"] == 0.0 and padded[0]["kl"] == 0.0 and padded[1]["kl"] != 0.0
    for a, b in zip(packed, padded, strict=True):
        assert a.keys() == b.keys()
        for k in ("kl", "policy_loss", "value_loss", "values/mean", "returns/mean", "entropy", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    with torch.no_grad():  # the packed pass of the trained module equals its padded pass, entropies included
        packed_out = ppo.policy_outputs(module, rollout, 0.8, with_entropy=True, packing=True)
        padded_out = ppo.policy_outputs(module, rollout, 0.8, with_entropy=True, packing=False)
    for got, want in zip(packed_out, padded_out, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    initial = ppo.PolicyValueModel(load_model(str(tiny_model_dir))[0], torch.nn.Linear(1, 1)).state_dict()
    for k, v in padded_weights.items():  # the same updates, up to Adam's rescaling of rounding-level gradients
        if k in initial and initial[k].shape == v.shape:
            moved, apart = (v - initial[k]).norm(), (packed_weights[k] - v).norm()
            assert moved > 0 and apart <= 1e-3 * moved, k
