"""Kahneman-Tversky optimisation (KTO): alignment from unpaired completions labelled desirable or not.

Ethayarajh et al. 2024 (https://arxiv.org/abs/2402.01306), sec. 4: with summed completion log-probs,
r(x, y) = log π(y|x) − log π_ref(y|x) and the reference point z0,

    desirable y:    loss = λ_D·(1 − σ(β·(r(x, y) − z0)))
    undesirable y:  loss = λ_U·(1 − σ(β·(z0 − r(x, y))))
    z0 = max(0, mean_j [log π(y'_j|x_j) − log π_ref(y'_j|x_j)])      (no gradient)

z0 estimates KL(π ‖ π_ref) on mismatched pairs: prompt x_j with the completion y'_j of another example, so
it measures how far the policy has moved in general, not on the labelled answers (``losses.kto_loss``).

Choices, and why:
- the mismatched pairing is fixed at set-up: example j gets the completion of one other example (a seeded
  random cycle over the data, so never its own). TRL rotates completions by one inside fixed-order batches;
  a fixed pairing gives the same estimator while batches still reshuffle every epoch, and it lets the
  reference log-probs of the mismatched pairs be precomputed with the matched ones. A batch's z0 is the
  mean over its B mismatched pairs, gathered over processes;
- the reference costs what it costs in DPO: log-probs precomputed in one no-grad pass before training by
  the policy itself (``precompute_ref``); with LoRA and ``precompute_ref`` off, the base model with the
  adapter disabled, live; or a separate ``--reference`` model;
- mismatched pairs go through their own no-grad forward: they carry no gradient, so no backward either;
- padding-free (``packing``, on by default): the examples of a micro-batch (and, apart, its mismatched pairs) are
  packed into rows behind a block mask, each computed exactly as if alone (``collate.pack_prompt_groups``), so
  short completions cost no padding; the no-grad passes that want both (the reference, the held-out evaluation)
  run each prompt once, followed by its completion and its mismatched one; ``--no-packing``: one right-padded row
  per example.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from alignkit import losses, packing
from alignkit.config import (
    DataConfig,
    ModelConfig,
    OptionError,
    above,
    arg,
    checked,
    model_location,
    need_data,
)
from alignkit.data import UnpairedExample, read_examples, unpaired_example
from alignkit.data.collate import PAIR_COST, attention_pair_cost, pack_prompt_groups, pad_prompt_completions
from alignkit.engine import Engine, TrainConfig, default_threads, distributed_state, total_steps_for
from alignkit.logprobs import LogprobModel, can_pack
from alignkit.models import adapter_disabled, load_model

# (example, mismatched completion ids, reference log-prob of the completion, of the mismatched pair)
Item = tuple[UnpairedExample, list[int], float, float]


@dataclass
class KTOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, warmup_ratio=0.1))
    beta: float = arg(0.1, "β: scale of the implicit reward β·log(π/π_ref) (paper 0.1)", check=above(0))
    desirable_weight: float = arg(1.0, "λ_D, loss weight of desirable examples (paper: λ_D·n_D / λ_U·n_U in [1, 4/3])",
                                  check=above(0))
    undesirable_weight: float = arg(1.0, "λ_U, loss weight of undesirable examples", check=above(0))
    reference: str = arg("", "reference model; empty: the initial policy", check=model_location)
    precompute_ref: bool = arg(True, "compute reference log-probs once before training")
    packing: bool = arg(True, "padding-free: a micro-batch's examples packed in rows with a block mask (SDPA "
                              "attention); --no-packing: one right-padded row per example")

    def check(self) -> None:
        need_data(self.data)
        if not self.precompute_ref and not self.reference and not self.model.lora:
            raise OptionError("precompute_ref", False, "--no-precompute-ref with full fine-tuning needs --reference MODEL "
                              "(no second copy is made)")


def mismatched_completions(examples: list[UnpairedExample], seed: int, max_length: int) -> list[list[int]]:
    """For each example, the completion of one other example: its neighbour on a seeded random cycle.

    A completion longer than the room left after this prompt is cut: the pair is only a sample for the KL
    estimate, never trained on, and its length must stay within what the user's max_length allows."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
    return [examples[partner[i]].completion_ids[: max(1, max_length - len(e.prompt_ids))] for i, e in enumerate(examples)]


def collate_unpaired(items: list[Item], pad_id: int, pack: bool = False, shared: bool = False,
                     pair_cost: float = PAIR_COST) -> dict:
    """Padded: labelled rows then mismatched rows, right-padded: (2B, L) input_ids / attention_mask / target_mask.
    Packed: ``labelled`` and ``mismatched``, each ``pack_prompt_groups``'s padding-free rows of its B sequences
    (planned with the model's ``pair_cost``);
    with ``shared`` instead one ``shared`` part where each prompt appears once, followed by its completion and its
    mismatched completion (for the no-grad passes that want both: the prompt's work is done once, not twice)."""
    ref = torch.tensor([[r, r_kl] for _, _, r, r_kl in items], dtype=torch.float32)
    batch = {"desirable": torch.tensor([e.desirable for e, _, _, _ in items]), "ref": ref[:, 0], "ref_kl": ref[:, 1]}
    labelled = [(e.prompt_ids, e.completion_ids) for e, _, _, _ in items]
    mismatched = [(e.prompt_ids, kl) for e, kl, _, _ in items]
    if pack:
        parts = {"shared": [(e.prompt_ids, [e.completion_ids, kl]) for e, kl, _, _ in items]} if shared else \
            {name: [(prompt, [completion]) for prompt, completion in rows]
             for name, rows in (("labelled", labelled), ("mismatched", mismatched))}
        for name, groups in parts.items():
            batch[name] = pack_prompt_groups(groups, pad_id, pair_cost=pair_cost)
            del batch[name]["last"]
        return batch
    input_ids, attention_mask, target_mask = pad_prompt_completions(labelled + mismatched, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask, **batch}


def completion_logps(module, batch: dict, part: str = "both") -> torch.Tensor:
    """Summed completion log-probs of the batch's ``labelled`` (B,) or ``mismatched`` (B,) sequences, or of
    ``both`` (2B,: labelled first), from any layout of ``collate_unpaired`` (a ``shared`` one gives ``both`` only);
    one forward per part asked for, one in all for a ``shared`` layout."""
    if "shared" in batch or "labelled" in batch:  # padding-free: (T,) token log-probs of each part, summed per sequence
        if "shared" in batch and part != "both":
            raise ValueError(f"a shared layout holds both parts; asked for {part!r}")
        parts = ("shared",) if "shared" in batch else ("labelled", "mismatched") if part == "both" else (part,)
        sums = []
        for name in parts:
            rows = batch[name]
            token = module(rows["input_ids"], None, rows["attention_mask"], rows["position_ids"],
                           at=(rows["target_index"], rows["source_index"]))
            total = torch.zeros(rows["lengths"].shape[0], dtype=token.dtype, device=token.device)
            sums.append(total.index_add(0, rows["response_index"], token))
        if "shared" in batch:  # responses are numbered group by group: (labelled, mismatched) per example
            return torch.cat([sums[0][0::2], sums[0][1::2]])
        return torch.cat(sums)
    b = batch["desirable"].shape[0]
    rows = {"both": slice(None), "labelled": slice(0, b), "mismatched": slice(b, None)}[part]
    return module(batch["input_ids"][rows], batch["target_mask"][rows], batch["attention_mask"][rows]).sum(-1)


def class_sums(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
               beta: float) -> dict[str, tuple[float, float]]:
    """(sum, count) over the desirable ("chosen") and undesirable ("rejected") examples of a micro-batch of the
    implicit reward β·(log π − log π_ref) and of log π: the engine divides the step's sums by its counts, so a
    micro-batch lacking one class adds nothing to that class's mean (a batch mean would add a 0)."""
    rewards = beta * (logps.detach().float() - ref_logps.to(logps.device).float())
    desirable = desirable.to(logps.device).bool()
    out = {}
    for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
        n = float(mask.sum())
        out[f"rewards/{name}"] = (float(rewards[mask].sum()), n)
        out[f"logps/{name}"] = (float(logps.detach().float()[mask].sum()), n)
    return out


def implicit_reward_accuracy(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """Fraction of (desirable, undesirable) pairs of examples whose implicit rewards are ordered right,
    r_desirable > r_undesirable (the ROC AUC of the reward as a classifier; ties count as wrong).
    Shapes: (N,), (N,) bool -> scalar. Sorting instead of an N_D x N_U matrix keeps it O(N log N)."""
    good, bad = rewards[desirable].sort().values, rewards[~desirable]
    if good.numel() == 0 or bad.numel() == 0:
        return torch.tensor(0.0)
    beaten = good.numel() - torch.searchsorted(good, bad, right=True)  # desirable rewards above each one
    return beaten.sum() / (good.numel() * bad.numel())


@torch.no_grad()
def reference_logps(module, items: list[Item], pad_id: int, autocast, batch_size: int = 16,
                    adapter_off=nullcontext, device: torch.device | None = None, pack: bool = False,
                    pair_cost: float = PAIR_COST) -> list[Item]:
    """Items with the reference log-probs of the labelled and the mismatched pair filled in, in one pass of
    ``module`` (a LogprobModel, or the sharded training module under FSDP) inside ``adapter_off()``."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0].prompt_ids) + len(items[i][0].completion_ids))
    values: dict[int, tuple[float, float]] = {}
    device = device if device is not None else next(module.parameters()).device
    # fp32 on CPU: the layers multiply by weights packed once for the whole pass (alignkit.packing)
    with adapter_off(), (packing.packed_linears(module, autocast) if items else nullcontext()):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate_unpaired([items[i] for i in idx], pad_id, pack, shared=True, pair_cost=pair_cost)
            batch = send_to_device(batch, device)
            with autocast():
                logps = completion_logps(module, batch)
            b = len(idx)
            for k, i in enumerate(idx):
                values[i] = (float(logps[k]), float(logps[b + k]))
    return [(e, kl, *values[i]) for i, (e, kl, _, _) in enumerate(items)]


def balance_note(examples: list[UnpairedExample], cfg: KTOConfig) -> str | None:
    """A hint when λ_D·n_D / (λ_U·n_U) is outside the KTO paper's advised range [1, 4/3]."""
    n_d = sum(e.desirable for e in examples)
    n_u = len(examples) - n_d
    if n_d == 0 or n_u == 0:
        return None
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    low = cfg.undesirable_weight * n_u / n_d
    return (f"alignkit: {n_d} desirable / {n_u} undesirable examples give λ_D·n_D / (λ_U·n_U) = {ratio:.3g}; the KTO "
            f"paper advises 1 to 4/3 (e.g. --desirable-weight between {low:.3g} and {4 / 3 * low:.3g})")


@checked
def train(cfg: KTOConfig) -> Path:
    default_threads()
    objective = partial(losses.kto_loss, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                        undesirable_weight=cfg.undesirable_weight)
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    make = partial(read_examples, make=unpaired_example, tokenizer=tokenizer, max_length=cfg.data.max_length,
                   skip_invalid=cfg.data.skip_invalid)
    examples = make(cfg.data.data)
    eval_examples = make(cfg.data.eval_data) if cfg.data.eval_data else []
    # the mismatched (prompt, other completion) pairs of the KL estimate, fixed once
    items = [(e, kl, 0.0, 0.0) for e, kl in zip(examples, mismatched_completions(examples, cfg.train.seed, cfg.data.max_length))]
    eval_kl = mismatched_completions(eval_examples, cfg.train.seed, cfg.data.max_length) if eval_examples else []
    eval_items = [(e, kl, 0.0, 0.0) for e, kl in zip(eval_examples, eval_kl)]

    # the reference: a separate model, the base under the LoRA adapter, or the policy before its first update
    ref_model = load_model(cfg.reference)[0] if cfg.reference else None
    total = total_steps_for(cfg.train, len(examples), distributed_state().num_processes)
    engine = Engine(cfg.train, model, tokenizer, total, train_module=LogprobModel(model),
                    run_config={"algo": "kto", **asdict(cfg)})
    note = balance_note(examples, cfg)
    if note and engine.is_main:
        print(note, file=sys.stderr)
    pack = cfg.packing and can_pack(model) and (ref_model is None or can_pack(ref_model))
    pair_cost = attention_pair_cost(model.config)  # what attention costs the padding-free rows (plan_rows)
    # no-grad passes of the policy go through the sharded module under FSDP; a separate reference is sharded too
    policy = engine.no_grad_module(LogprobModel(model))
    ref_module = engine.frozen(LogprobModel(ref_model)) if ref_model is not None else policy
    lora_ref = ref_model is None and cfg.model.lora
    adapter_off = partial(adapter_disabled, model) if lora_ref else nullcontext
    if not cfg.precompute_ref and ref_model is None and not cfg.model.lora:
        raise ValueError("--no-precompute-ref with full fine-tuning needs --reference MODEL (no second copy is made)")
    # computed before resume() can load trained weights, so the reference is always the initial policy
    with engine.inference():
        train_items = reference_logps(ref_module, items, pad_id, engine.autocast, adapter_off=adapter_off,
                                      device=engine.device, pack=pack, pair_cost=pair_cost) if cfg.precompute_ref else items
        eval_items = reference_logps(ref_module, eval_items, pad_id, engine.autocast, adapter_off=adapter_off,
                                     device=engine.device, pack=pack, pair_cost=pair_cost)

    def live_reference(batch: dict) -> None:
        with torch.no_grad(), adapter_off():
            logps = completion_logps(ref_module, batch)
        b = logps.shape[0] // 2
        batch["ref"], batch["ref_kl"] = logps[:b].float(), logps[b:].float()

    def kl_estimate(kl_logps: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
        pairs = torch.stack([kl_logps.float(), ref_kl.to(kl_logps.device).float()], dim=1)  # (B, 2)
        if engine.world_size > 1:  # one z0 for the global micro-batch, as in TRL
            pairs = engine.accelerator.gather(pairs)
        return losses.kto_kl_estimate(pairs[:, 0], pairs[:, 1])

    def loss_fn(module, batch):
        if not cfg.precompute_ref:
            live_reference(batch)
        with torch.no_grad():
            z0 = kl_estimate(completion_logps(module, batch, "mismatched"), batch["ref_kl"])
        logps = completion_logps(module, batch, "labelled")
        per_example, metrics = objective(logps, batch["ref"], batch["desirable"], z0)
        return per_example.sum(), {"loss": per_example.mean().item(), "kl": float(metrics["kl"]),
                                   **class_sums(logps, batch["ref"], batch["desirable"], cfg.beta)}

    def evaluate() -> dict[str, float]:
        with engine.inference():
            return _evaluate()

    def _evaluate() -> dict[str, float]:
        # z0 and the losses over the whole held-out set at once, so its value does not depend on batching
        logps, kl_logps = [], []
        for start in range(0, len(eval_items), 16):
            batch = engine.to_device(collate_unpaired(eval_items[start : start + 16], pad_id, pack, shared=True,
                                                      pair_cost=pair_cost))
            with engine.autocast():
                both = completion_logps(policy, batch)
            b = both.shape[0] // 2
            logps.append(both[:b])
            kl_logps.append(both[b:])
        logps = torch.cat(logps)
        ref, ref_kl = (torch.tensor([item[k] for item in eval_items]) for k in (2, 3))
        desirable = torch.tensor([e.desirable for e, _, _, _ in eval_items])
        z0 = losses.kto_kl_estimate(torch.cat(kl_logps), ref_kl)
        per_example, metrics = objective(logps, ref, desirable, z0)
        accuracy = implicit_reward_accuracy(cfg.beta * (logps - ref), desirable)
        scores = {"loss": per_example.mean(), **metrics, "rewards/accuracies": accuracy}
        return {f"eval/{k}": float(v) for k, v in scores.items()}

    collate = partial(collate_unpaired, pad_id=pad_id, pack=pack, pair_cost=pair_cost)
    engine.derived_metrics["rewards/margins"] = lambda logs: logs["rewards/chosen"] - logs["rewards/rejected"]
    engine.fit(train_items, collate, loss_fn, lambda batch: batch["desirable"].shape[0],
               evaluate if eval_items else None, shown=("eval/loss", "eval/rewards/accuracies"))
    return engine.finish()
