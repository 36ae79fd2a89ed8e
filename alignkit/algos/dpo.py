"""Direct preference optimisation and its family: DPO, cDPO, IPO, hinge, robust DPO, SimPO, ORPO.

Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290): with summed response log-probs,

    loss = −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])

The variants differ only in the function of those four numbers (``alignkit.losses``); SimPO and ORPO need no
reference model. The reference costs as little as possible:
- its log-probs are precomputed in one no-grad pass before training (``precompute_ref``), by the policy itself
  before its first update, so no second copy of the weights is ever held;
- with LoRA and ``precompute_ref`` off, the reference is the base model with the adapter disabled;
- chosen and rejected go through one forward pass, and the LM head runs only at response positions;
- padding-free (``packing``, on by default): a pair's prompt is computed once, followed by its chosen and its
  rejected answer, and the pairs of a micro-batch are packed in a few rows with a block-diagonal attention mask
  (``alignkit.data.collate.pack_prompt_groups``); each answer's log-probs equal those of the padded forward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from alignkit import losses, packing
from alignkit.config import (
    DataConfig,
    ModelConfig,
    OptionError,
    arg,
    at_least,
    between,
    checked,
    model_location,
    need_data,
)
from alignkit.data import DataError, PreferenceExample, preference_example, read_examples
from alignkit.data.collate import PAIR_COST, attention_pair_cost, pack_prompt_groups, pad_prompt_completions
from alignkit.engine import Engine, TrainConfig, default_threads, distributed_state, total_steps_for
from alignkit.logprobs import LogprobModel, can_pack
from alignkit.models import adapter_disabled, load_model

REFERENCE_FREE = ("simpo", "orpo")
# β when --beta is not given: the papers' (and TRL's) defaults. SimPO's β scales a length-normalised reward, so its
# scale differs: the SimPO repository's default is β = 2.0 with γ/β = 0.25, i.e. γ = 0.5 (our --simpo-gamma, which
# is γ itself, as TRL's simpo_gamma). ORPO has no β (its weight is --orpo-lambda).
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1, "simpo": 2.0, "orpo": 0.0}


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7, warmup_ratio=0.1))
    loss: str = arg("sigmoid", "sigmoid (DPO) | ipo | hinge | robust | simpo | orpo",
                    choices=(*losses.DPO_LOSSES, *REFERENCE_FREE))
    beta: float = arg(0.0, "β: strength of the KL constraint (SimPO: reward scale); 0: the loss's default "
                           "(0.1; SimPO 2.0)", check=at_least(0))
    label_smoothing: float = arg(0.0, "ε: assumed label-flip rate (cDPO with sigmoid, rDPO with robust)",
                                 check=between(0, 0.5))
    simpo_gamma: float = arg(0.5, "SimPO target margin γ in reward units (not γ/β; 0.5 = the paper's 0.25 x β 2.0)")
    orpo_lambda: float = arg(0.1, "ORPO weight λ of the odds-ratio term", check=at_least(0))
    reference: str = arg("", "reference model; empty: the initial policy", check=model_location)
    precompute_ref: bool = arg(True, "compute reference log-probs once before training")
    packing: bool = arg(True, "padding-free: each prompt once, then its chosen and rejected answers, packed in rows "
                              "with a block mask (SDPA attention); --no-packing: one right-padded row per answer")

    def loss_beta(self) -> float:
        """--beta, or the loss's default when it is not given (0)."""
        return self.beta or DEFAULT_BETA.get(self.loss, 0.1)

    def check(self) -> None:
        need_data(self.data)
        if self.loss in ("ipo", "hinge") and self.label_smoothing:
            raise OptionError("label_smoothing", self.label_smoothing, f"must be 0 with --loss {self.loss} (not defined for it)")
        if self.loss == "robust" and self.label_smoothing >= 0.5:
            raise OptionError("label_smoothing", self.label_smoothing, "robust DPO needs a value < 0.5")
        if self.loss not in REFERENCE_FREE and not self.precompute_ref and not self.reference and not self.model.lora:
            raise OptionError("precompute_ref", False, "--no-precompute-ref with full fine-tuning needs --reference MODEL "
                              "(no second copy is made)")


@dataclass
class PairLogps:
    """Summed response log-probs and response lengths of a batch of pairs, (B,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    label: torch.Tensor | None = None  # (B,) P(chosen preferred) of soft-labelled data (RLAIF); None: all hard


def make_objective(cfg: DPOConfig) -> Callable[[PairLogps], tuple[torch.Tensor, dict]]:
    """The loss, chosen once: PairLogps -> (per-pair losses, metrics)."""
    cfg = replace(cfg, beta=cfg.loss_beta())

    def smoothing(p: PairLogps):
        """cDPO's ε per pair: a soft label p (an AI labeller's P(chosen preferred)) is the pair's own
        ε = 1 − p, so the loss is −p·log σ(βh) − (1 − p)·log σ(−βh), the soft-label cross-entropy of the
        implicit reward model (as the reward model's soft-label loss); hard pairs keep --label-smoothing."""
        if p.label is None:
            return cfg.label_smoothing
        return torch.where(p.label < 1.0, 1.0 - p.label, torch.full_like(p.label, cfg.label_smoothing))

    if cfg.loss == "simpo":
        return lambda p: losses.simpo_loss(p.chosen, p.rejected, p.chosen_len, p.rejected_len, cfg.beta,
                                           cfg.simpo_gamma, smoothing(p))
    if cfg.loss == "orpo":
        return lambda p: losses.orpo_loss(p.chosen / p.chosen_len, p.rejected / p.rejected_len,
                                          -p.chosen / p.chosen_len, cfg.orpo_lambda)
    if cfg.loss not in losses.DPO_LOSSES:
        raise ValueError(f"--loss must be one of {', '.join([*losses.DPO_LOSSES, *REFERENCE_FREE])}, got {cfg.loss!r}")
    fn = losses.DPO_LOSSES[cfg.loss]
    if cfg.loss == "ipo":  # IPO's target 1/(2β) is defined on length-averaged log-probs
        return lambda p: fn(p.chosen / p.chosen_len, p.rejected / p.rejected_len, p.ref_chosen / p.chosen_len,
                            p.ref_rejected / p.rejected_len, cfg.beta, cfg.label_smoothing)
    if cfg.loss == "sigmoid":
        return lambda p: fn(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, cfg.beta, smoothing(p))
    return lambda p: fn(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, cfg.beta, cfg.label_smoothing)


def collate_pairs(items: list[tuple[PreferenceExample, float, float]], pad_id: int,
                  pack: bool = False, pair_cost: float = PAIR_COST) -> dict[str, torch.Tensor]:
    """Padded: chosen rows then rejected rows, right-padded: (2B, L) input_ids / attention_mask / target_mask.
    Packed: ``pack_prompt_groups``'s padding-free rows (planned with the model's ``pair_cost``), each prompt once,
    with the B chosen answers numbered before the B rejected ones (``target_index`` / ``source_index`` /
    ``response_index``, ``lengths`` (2B,))."""
    if pack:
        batch = pack_prompt_groups([(e.prompt_ids, [e.chosen_ids, e.rejected_ids]) for e, _, _ in items], pad_id,
                                   pair_cost=pair_cost)
        b = len(items)
        batch["response_index"] = (batch["response_index"] % 2) * b + batch["response_index"] // 2  # (c0, r0, ..) -> (c.., r..)
        batch["lengths"] = batch["lengths"].view(b, 2).t().reshape(-1)
        del batch["last"]
    else:
        rows = [(e.prompt_ids, e.chosen_ids) for e, _, _ in items] + [(e.prompt_ids, e.rejected_ids) for e, _, _ in items]
        input_ids, attention_mask, target_mask = pad_prompt_completions(rows, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}
    ref = torch.tensor([[c, r] for _, c, r in items], dtype=torch.float32)
    batch.update(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1])
    if any(e.label != 1.0 for e, _, _ in items):
        batch["label"] = torch.tensor([e.label for e, _, _ in items], dtype=torch.float32)
    return batch


def pair_logps(module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (2B,) and response lengths (2B,) in one forward pass of a LogprobModel, from
    either layout of ``collate_pairs``."""
    if "source_index" in batch:  # padding-free: (T,) token log-probs, summed per answer
        token = module(batch["input_ids"], None, batch["attention_mask"], batch["position_ids"],
                       at=(batch["target_index"], batch["source_index"]))
        lengths = batch["lengths"]
        sums = torch.zeros(lengths.shape[0], dtype=token.dtype, device=token.device)
        return sums.index_add(0, batch["response_index"], token), lengths.float()
    token = module(batch["input_ids"], batch["target_mask"], batch["attention_mask"])
    return token.sum(-1), batch["target_mask"].sum(-1).float()


def _split(logps: torch.Tensor, lengths: torch.Tensor, batch: dict) -> PairLogps:
    b = logps.shape[0] // 2
    return PairLogps(logps[:b], logps[b:], lengths[:b], lengths[b:], batch["ref_chosen"], batch["ref_rejected"],
                     batch.get("label"))


@torch.no_grad()
def reference_logps(module, examples: list[PreferenceExample], pad_id: int, autocast, batch_size: int = 16,
                    adapter_off=nullcontext, device: torch.device | None = None, pack: bool = False,
                    pair_cost: float = PAIR_COST) -> list[tuple[PreferenceExample, float, float]]:
    """(example, ref chosen log-prob, ref rejected log-prob) for every example, in one no-grad pass of
    ``module`` (a LogprobModel, or the sharded training module under FSDP: every process then passes all examples,
    so the gathers pair up), inside ``adapter_off()`` (the LoRA reference)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].chosen_ids))
    values: dict[int, tuple[float, float]] = {}
    device = device if device is not None else next(module.parameters()).device
    # fp32 on CPU: the layers multiply by weights packed once for the whole pass (alignkit.packing)
    with adapter_off(), (packing.packed_linears(module, autocast) if examples else nullcontext()):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = send_to_device(collate_pairs([(examples[i], 0.0, 0.0) for i in idx], pad_id, pack, pair_cost), device)
            with autocast():
                logps, _ = pair_logps(module, batch)
            b = len(idx)
            for k, i in enumerate(idx):
                values[i] = (float(logps[k]), float(logps[b + k]))
    return [(e, *values[i]) for i, e in enumerate(examples)]


@checked
def train(cfg: DPOConfig) -> Path:
    default_threads()
    given = cfg.beta
    cfg = replace(cfg, beta=cfg.loss_beta())  # recorded as used in the run's config
    objective = make_objective(cfg)
    needs_ref = cfg.loss not in REFERENCE_FREE
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    make = partial(read_examples, make=preference_example, tokenizer=tokenizer, max_length=cfg.data.max_length,
                   skip_invalid=cfg.data.skip_invalid)
    examples = make(cfg.data.data)
    eval_examples = make(cfg.data.eval_data) if cfg.data.eval_data else []
    soft = next((e for e in [*examples, *eval_examples] if e.label != 1.0), None)
    if soft is not None and cfg.loss not in ("sigmoid", "simpo"):
        raise DataError(f"{soft.where}: soft label {soft.label} (AI-labelled data) needs --loss sigmoid (cDPO: "
                        f"ε = 1 − label per pair) or simpo; --loss {cfg.loss} has no soft-label form")

    # the reference: a separate model, the base under the LoRA adapter, or the policy before its first update
    ref_model = load_model(cfg.reference)[0] if cfg.reference else None
    total = total_steps_for(cfg.train, len(examples), distributed_state().num_processes)
    engine = Engine(cfg.train, model, tokenizer, total, train_module=LogprobModel(model),
                    run_config={"algo": "dpo", **asdict(cfg)})
    if engine.is_main and cfg.loss != "orpo":
        print(f"dpo: --loss {cfg.loss}, beta {cfg.beta:g}" + ("" if given else " (the loss's default; set --beta to change)"))
    # no-grad passes of the policy go through the sharded module under FSDP; a separate reference is sharded too
    policy = engine.no_grad_module(LogprobModel(model))
    ref_module = engine.frozen(LogprobModel(ref_model)) if ref_model is not None else policy
    lora_ref = ref_model is None and cfg.model.lora
    adapter_off = partial(adapter_disabled, model) if lora_ref else nullcontext
    if needs_ref and not cfg.precompute_ref and ref_model is None and not cfg.model.lora:
        raise ValueError("--no-precompute-ref with full fine-tuning needs --reference MODEL (no second copy is made)")
    zeros = [(e, 0.0, 0.0) for e in eval_examples]
    pack = cfg.packing and can_pack(model) and (ref_model is None or can_pack(ref_model))
    pair_cost = attention_pair_cost(model.config)  # what attention costs the padding-free rows (plan_rows)
    if needs_ref:
        # computed before resume() can load trained weights, so the reference is always the initial policy
        with engine.inference():
            train_items = reference_logps(ref_module, examples, pad_id, engine.autocast, adapter_off=adapter_off,
                                          device=engine.device, pack=pack, pair_cost=pair_cost) \
                if cfg.precompute_ref else [(e, 0.0, 0.0) for e in examples]
            eval_items = reference_logps(ref_module, eval_examples, pad_id, engine.autocast, adapter_off=adapter_off,
                                         device=engine.device, pack=pack, pair_cost=pair_cost)
    else:
        train_items, eval_items = [(e, 0.0, 0.0) for e in examples], zeros

    def live_reference(batch: dict) -> None:
        # inside the training step, before its forward: under FSDP the gathered root is the one that forward uses
        with torch.no_grad(), adapter_off():
            logps, _ = pair_logps(ref_module, batch)
        b = logps.shape[0] // 2
        batch["ref_chosen"], batch["ref_rejected"] = logps[:b].float(), logps[b:].float()

    def loss_fn(module, batch):
        if needs_ref and not cfg.precompute_ref:
            live_reference(batch)
        logps, lengths = pair_logps(module, batch)
        per_pair, metrics = objective(_split(logps, lengths, batch))
        return per_pair.sum(), {"loss": per_pair.mean().item(), **{k: float(v) for k, v in metrics.items()}}

    def evaluate() -> dict[str, float]:
        with engine.inference():
            return _evaluate()

    def _evaluate() -> dict[str, float]:
        totals: dict[str, float] = {}
        for start in range(0, len(eval_items), 16):
            batch = engine.to_device(collate_pairs(eval_items[start : start + 16], pad_id, pack, pair_cost))
            with engine.autocast():
                logps, lengths = pair_logps(policy, batch)
            per_pair, metrics = objective(_split(logps, lengths, batch))
            n = per_pair.shape[0]
            for k, v in {"loss": per_pair.mean(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
        return {f"eval/{k}": v / len(eval_items) for k, v in totals.items()}

    collate = partial(collate_pairs, pad_id=pad_id, pack=pack, pair_cost=pair_cost)
    engine.fit(train_items, collate, loss_fn, lambda batch: batch["ref_chosen"].shape[0],
               evaluate if eval_items else None, shown=("eval/loss", "eval/rewards/accuracies"))
    return engine.finish()
