"""Supervised fine-tuning: maximise log p(completion | prompt), loss on completion tokens only.

Prompt and padding tokens carry label -100 and never enter the loss. With ``packing`` several short examples
share one row; their position ids restart so none attends to another (see ``alignkit.data.collate``). Without it,
``padding_free`` (default) lays out each micro-batch's own examples that way: the same batches, no padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from alignkit import packing
from alignkit.config import DataConfig, ModelConfig, arg, checked, need_data
from alignkit.data import IGNORE, read_examples, sft_example
from alignkit.data.collate import attention_pair_cost, collate_packed, collate_padding_free, pack_sft, pad_sft
from alignkit.engine import Engine, TrainConfig, default_threads, distributed_state, total_steps_for
from alignkit.logprobs import LogprobModel
from alignkit.models import load_model


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))
    packing: bool = arg(False, "pack several short examples into each row of max_length tokens")
    padding_free: bool = arg(True, "without --packing: a micro-batch's examples share rows with no padding (position "
                                   "ids restart per example); --no-padding-free: one right-padded row per example")

    def check(self) -> None:
        need_data(self.data)


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    target = batch["labels"] != IGNORE
    target[:, 0] = False  # nothing predicts the first token
    return target


def sft_loss(module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed negative log-likelihood of the target tokens: -sum_t log p(y_t | x, y_<t)."""
    target = _targets(batch)
    logps = module(batch["input_ids"], target, batch.get("attention_mask"), batch.get("position_ids"))
    nll = -(logps * target).sum()
    return nll, {"loss": nll.item() / max(1, int(target.sum()))}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int(_targets(batch).sum())


@torch.no_grad()
def mean_nll(module, batches, autocast) -> float:
    """Token-mean NLL of the target tokens over ``batches`` (held-out loss) under ``module`` (a LogprobModel, or
    the sharded training module under FSDP)."""
    total, count = 0.0, 0
    for batch in batches:
        target = _targets(batch)
        with autocast():
            logps = module(batch["input_ids"], target, batch.get("attention_mask"), batch.get("position_ids"))
        total -= float((logps * target).sum())
        count += int(target.sum())
    return total / max(1, count)


@checked
def train(cfg: SFTConfig) -> Path:
    default_threads()
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    make = partial(read_examples, make=sft_example, tokenizer=tokenizer, max_length=cfg.data.max_length,
                   skip_invalid=cfg.data.skip_invalid)
    examples = make(cfg.data.data)
    eval_examples = make(cfg.data.eval_data) if cfg.data.eval_data else []
    pad_id = tokenizer.pad_token_id
    pair_cost = attention_pair_cost(model.config)  # what attention costs the padding-free rows (plan_rows)
    if cfg.packing:
        examples = pack_sft(examples, cfg.data.max_length)
        collate = partial(collate_packed, pad_id=pad_id)
    elif cfg.padding_free:
        collate = partial(collate_padding_free, pad_id=pad_id, pair_cost=pair_cost)
    else:
        collate = partial(pad_sft, pad_id=pad_id)

    total = total_steps_for(cfg.train, len(examples), distributed_state().num_processes)
    engine = Engine(cfg.train, model, tokenizer, total, train_module=LogprobModel(model), run_config={"algo": "sft", **asdict(cfg)})
    # held-out batches without padding too (any layout gives the same NLL); no gradients, so 16 examples at a time
    eval_collate = partial(collate_padding_free, pad_id=pad_id, pair_cost=pair_cost) if cfg.packing or cfg.padding_free \
        else partial(pad_sft, pad_id=pad_id)
    eval_batches = [engine.to_device(eval_collate(eval_examples[i : i + 16])) for i in range(0, len(eval_examples), 16)]
    policy = engine.no_grad_module(LogprobModel(model))  # under FSDP the sharded module: gathers as in training

    def held_out() -> dict[str, float]:
        # fp32 on CPU: the layers multiply by weights packed once per evaluation (alignkit.packing)
        with engine.inference(), packing.packed_linears(policy, engine.autocast):
            return {"eval/loss": mean_nll(policy, eval_batches, engine.autocast)}

    engine.fit(examples, collate, sft_loss, count_targets, held_out if eval_batches else None, shown=("eval/loss",))
    return engine.finish()
