"""The one training engine every algorithm calls (never subclasses).

It owns what is the same for all of them: the ``accelerate`` set-up (so one code path runs single-process on a
CPU and under DDP/FSDP/DeepSpeed), AdamW with warmup + cosine/linear decay, gradient accumulation and clipping,
bf16 autocast, seeding, atomic Hugging Face-format checkpoints that resume exactly, and logging.

Losses are normalised by the number of items (tokens or examples) in the whole global batch, counted before
the backward passes; so 2 processes x batch b, 1 process x batch 2b, and accumulation over micro-batches all
produce the same gradient.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, send_to_device, set_seed
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from alignkit.config import above, arg, at_least, between
from alignkit.models import _atomic_dir, bf16_is_fast, unwrap


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


TRACKERS = ("tensorboard", "wandb", "mlflow")


def _trackers_check(value: str) -> str | None:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if all(n in (*TRACKERS, "none") for n in names):
        return None
    return f"expected a comma-separated list of {', '.join(TRACKERS)} or none"


@dataclass
class TrainConfig:
    """Flags every trainer shares."""

    output_dir: str = arg("runs/alignkit", "checkpoints go in checkpoint-N/, the final model in final/")
    max_steps: int = arg(-1, "optimizer steps; -1 derives them from epochs", check=at_least(-1))
    epochs: float = arg(1.0, "passes over the data when max_steps is -1", check=above(0))
    batch_size: int = arg(8, "examples per process per micro-batch", check=at_least(1))
    grad_accum: int = arg(1, "micro-batches per optimizer step", check=at_least(1))
    lr: float = arg(1e-5, "peak learning rate (AdamW)", check=above(0))
    weight_decay: float = arg(0.0, "AdamW weight decay", check=at_least(0))
    warmup_steps: int = arg(0, "linear warmup steps; overrides warmup_ratio when > 0", check=at_least(0))
    warmup_ratio: float = arg(0.0, "fraction of the steps spent warming up", check=between(0, 1))
    schedule: str = arg("cosine", "learning-rate decay after warmup: cosine, linear or constant",
                        choices=("cosine", "linear", "constant"))
    max_grad_norm: float = arg(1.0, "gradient clipping norm; 0 disables", check=at_least(0))
    mixed_precision: str = arg("auto", "bf16 (autocast, fp32 master weights), no, or auto: bf16 where the hardware has it",
                               choices=("auto", "bf16", "no"))
    seed: int = arg(0, "seed for initialisation, shuffling and sampling")
    save_steps: int = arg(0, "write a checkpoint every N steps; 0: only the final model", check=at_least(0))
    save_total_limit: int = arg(2, "checkpoints kept, oldest removed first", check=at_least(1))
    log_steps: int = arg(1, "log metrics every N steps", check=at_least(1))
    eval_steps: int = arg(0, "evaluate every N steps; 0: before and after training only", check=at_least(0))
    resume: bool = arg(False, "continue from the newest checkpoint in output_dir")
    report_to: str = arg("tensorboard", "comma-separated trackers: tensorboard, wandb, mlflow, none", check=_trackers_check)
    progress: bool = arg(True, "show a progress bar with ETA")

    @property
    def world_batch(self) -> int:
        return self.batch_size * self.grad_accum


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    return factor


def _trackers(cfg: TrainConfig) -> list[str]:
    available = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    chosen = []
    for name in [n.strip() for n in cfg.report_to.split(",") if n.strip() and n.strip() != "none"]:
        module = available.get(name)
        if module is None:
            raise ValueError(f"report_to: unknown tracker {name!r}; expected tensorboard, wandb or mlflow")
        try:
            __import__(module)
            chosen.append(name)
        except ImportError:
            print(f"alignkit: {name} is not installed; not reporting to it", file=sys.stderr)
    return chosen


class Engine:
    """Optimizer, schedule, distributed wrapping, checkpoints and logs for one training run.

    ``model`` is what gets saved (a transformers or peft model); ``train_module`` is what computes the loss
    (default: the model itself), e.g. a ``LogprobModel`` around it or a policy with a value head. Extra trainable
    modules that are not part of ``model`` are saved and restored through ``extra_modules``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        total_steps: int,
        train_module: torch.nn.Module | None = None,
        extra_modules: dict[str, torch.nn.Module] | None = None,
        run_config: dict | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.extra_modules = extra_modules or {}
        # Accelerator settings are process-global; a second run in the same process (a notebook, a pipeline,
        # the tests) may ask for a different precision. The distributed state itself is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=_cpu_only(),
            mixed_precision=resolve_precision(cfg.mixed_precision),
            log_with=_trackers(cfg) or None,
            project_dir=cfg.output_dir,
        )
        set_seed(cfg.seed)
        keep_freed_memory()
        self.output_dir = Path(cfg.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        train_module = train_module if train_module is not None else model
        # FSDP's transformer-block wrapping (accelerate's and ours) looks for the block classes on the module it wraps
        if getattr(train_module, "_no_split_modules", None) is None:
            train_module._no_split_modules = getattr(unwrap(model), "_no_split_modules", None)
        self.fsdp_on_cpu = _fsdp_on_cpu(self.accelerator)
        if self.fsdp_on_cpu or self.accelerator.distributed_type == DistributedType.FSDP:
            self._same_start(train_module)
        if self.fsdp_on_cpu:
            shard_fsdp2(train_module)  # before the optimizer: it must hold the sharded parameters
        params = [p for p in train_module.parameters() if p.requires_grad]
        # the fused kernel does one pass over each parameter instead of several elementwise ops
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed wants the micro-batch size (accelerate reads it from a DataLoader, which we do not use) and
            # counts micro-batches itself: it steps after grad_accum of them and divides each loss by grad_accum
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
            ds_config["gradient_accumulation_steps"] = cfg.grad_accum
        if self.fsdp_on_cpu:
            self.module, self.optimizer = train_module, self.accelerator.prepare(optimizer)
        else:
            self.module, self.optimizer = self.accelerator.prepare(train_module, optimizer)
        # FSDP2 replaces parameters by sharded DTensors (accelerate re-points the optimizer at them)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if self.world_size == 1 and self.accelerator.distributed_type == DistributedType.NO:
            embedding_rows_into_tied_head(model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, total_steps))
        self.step = 0
        self.run_config = {"train": asdict(cfg), **(run_config or {})}
        if self.accelerator.trackers:
            self.accelerator.init_trackers("alignkit", config=_flat_scalars(self.run_config))
        self._bar = None
        self._started = time.time()
        self._gathered_depth = 0
        self._frozen: list[torch.nn.Module] = []  # sharded read-only modules (references), resharded with the policy
        self.derived_metrics: dict[str, Callable[[dict[str, float]], float]] = {}

    def _same_start(self, module: torch.nn.Module) -> None:
        """Every process takes rank 0's initial weights (one broadcast per tensor). Fresh random parts (a LoRA
        adapter, a value or score head) are drawn by each process from its own random state; DDP broadcasts rank
        0's module when it wraps it, but FSDP shards whatever each process holds, so without this the shards of
        one weight would come from different initialisations."""
        if self.world_size == 1:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            on_device = tensor.data.to(self.device)
            torch.distributed.broadcast(on_device, src=0)
            if on_device is not tensor.data:
                tensor.data.copy_(on_device)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self):
        return self.accelerator.autocast()

    def to_device(self, batch: Any) -> Any:
        """``batch`` (tensors in dicts, lists, or objects with a ``to(device)`` such as a Rollout) on this
        process's device: the one place where training and evaluation batches leave the CPU."""
        return send_to_device(batch, self.device)

    @property
    def sharded(self) -> bool:
        """True under FSDP: each process holds a shard of every weight (DTensor parameters)."""
        return any(isinstance(p, DTensor) for p in self.params)

    # ------------------------------------------------------------------- passes outside the training step
    def no_grad_module(self, plain: torch.nn.Module) -> torch.nn.Module:
        """The module for no-grad passes (reference log-probs, eval loss) of the policy: under FSDP the sharded
        training module itself, whose forward gathers one unit at a time, as in training (every process must then
        make the same number of calls: the callers iterate over data shared by all processes); else ``plain``
        (the same computation without the DDP wrapper and its per-forward buffer broadcast)."""
        return self.module if self.sharded else plain

    @contextmanager
    def inference(self) -> Iterator[None]:
        """No-grad passes through ``no_grad_module``/``frozen`` modules. Under FSDP every unit is resharded after:
        FSDP2 keeps its root unit gathered after a forward (it expects the backward next), and gathered weights
        left behind would be what a later save reads or a resume writes, not the sharded ones the optimizer owns."""
        try:
            with torch.no_grad():
                yield
        finally:
            self.reshard()

    def reshard(self) -> None:
        """Free every gathered FSDP unit of the policy and of the frozen modules (no-op elsewhere)."""
        if self.sharded:
            for unit in _fsdp_units(self.module, *self._frozen):
                unit.reshard()

    def frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A module that is only read, e.g. a reference model, placed like the policy: under FSDP sharded as well
        (FSDP2 over the processes, every unit freed after its forward, root included since no backward follows),
        so it costs 1/N of its weights per process instead of a whole copy, which under FSDP would outweigh the
        policy's own 16/N bytes per parameter (weights, gradients, AdamW moments) from N = 4 processes on. Its
        passes are collectives: every process must call it equally often. Elsewhere moved to the device."""
        module.requires_grad_(False).eval()
        if not self.sharded:
            return module.to(self.device)
        if getattr(module, "_no_split_modules", None) is None:
            module._no_split_modules = getattr(unwrap(getattr(module, "lm", module)), "_no_split_modules", None)
        shard_fsdp2(module, reshard_root=True)
        self._frozen.append(module)
        return module

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """The policy's whole weights in place for passes outside the training forward that cannot be collectives:
        sampling (each process decodes its own prompts for its own number of steps) and the evaluation passes
        around it. torch's FSDP2 has no summon_full_params; this is its equivalent: every unit is all-gathered
        (``unshard``) and set not to reshard after forward, so the units' forward hooks find their weights
        gathered and do nothing (no collective); on exit every unit is resharded and its setting restored.
        LoRA adapters are gathered with the blocks they sit in, so sampling sees base + adapter. Costs the
        whole weights per process for the duration, as a DDP replica would. Nests; no-op when not sharded."""
        if not self.sharded or self._gathered_depth:
            self._gathered_depth += 1
            try:
                yield
            finally:
                self._gathered_depth -= 1
            return
        from torch.distributed.fsdp import fully_shard

        # FSDP2 makes the first unit to run a forward its root; a block running first here would claim that
        fully_shard.state(self.module)._lazy_init()
        units = _fsdp_units(self.module)
        # FSDP2 has no getter for a unit's reshard-after-forward setting: keep the groups' own values to restore
        saved = [(group, group.post_forward_mesh_info) for unit in units for group in fully_shard.state(unit)._fsdp_param_groups]
        self._gathered_depth = 1
        try:
            for unit in units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
            yield
        finally:
            self._gathered_depth = 0
            for unit in units:
                unit.reshard()
            for group, info in saved:
                group.post_forward_mesh_info = info

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (an all-reduce: every process must call it); itself in one process.
        For statistics that are global by definition (e.g. ``losses.masked_whiten(..., all_sum=engine.all_sum)``)."""
        return self.accelerator.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    # ------------------------------------------------------------------------------------------- one update
    def update(
        self,
        micro_batches: Sequence[Any],
        loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
        count_fn: Callable[[Any], int],
    ) -> dict[str, float]:
        """One optimizer step over this process's micro-batches.

        ``loss_fn(module, batch) -> (loss_sum, metrics)`` returns the loss summed over the batch's items;
        ``count_fn(batch)`` counts those items (target tokens, pairs, ...). The gradient is that of the mean over
        all items of the global batch (all micro-batches of all processes).

        A metric is logged as its mean over the micro-batches, or, given as a ``(sum, count)`` pair, as
        Σ sum / Σ count over the whole step (all micro-batches and processes): the mean over the items of a
        subset that some micro-batches lack (e.g. KTO's desirable examples), left out when the step has none.
        ``derived_metrics`` (name -> fn(logs)) are computed from the step's logs afterwards.
        """
        local = torch.tensor(float(sum(count_fn(b) for b in micro_batches)), device=self.device)
        total = self.accelerator.reduce(local, reduction="sum").item() if self.world_size > 1 else local.item()
        # DDP averages gradients over processes, hence the world_size factor
        scale = self.world_size / max(total, 1.0)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            scale *= len(micro_batches)  # undo DeepSpeed's own division by gradient_accumulation_steps
        sums: dict[str, float] = {}
        parts: dict[str, tuple[float, float]] = {}  # (sum, count) metrics
        for k, batch in enumerate(micro_batches):
            batch = self.to_device(batch)  # collate builds CPU tensors; the model may sit on a GPU
            last = k == len(micro_batches) - 1
            sync = nullcontext() if last or self.world_size == 1 else self.accelerator.no_sync(self.module)
            with sync:
                with self.autocast():
                    loss_sum, metrics = loss_fn(self.module, batch)
                if not torch.isfinite(loss_sum.detach()):
                    self._diverged(float(loss_sum.detach()))
                self.accelerator.backward(loss_sum * scale)
            for name, value in metrics.items():
                if isinstance(value, tuple):
                    total_sum, count = parts.get(name, (0.0, 0.0))
                    parts[name] = (total_sum + float(value[0]), count + float(value[1]))
                else:
                    sums[name] = sums.get(name, 0.0) + float(value)
        logs = {name: value / len(micro_batches) for name, value in sums.items()}
        logs["tokens"] = float(sum(batch_tokens(b) for b in micro_batches))  # this process's, for throughput
        if self.cfg.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards, replicated
                grad_norm = grad_norm.full_tensor()
            if grad_norm is not None:  # DeepSpeed clips inside its step and may not report the norm
                if not torch.isfinite(grad_norm):
                    self._diverged(float(grad_norm), what="gradient norm")
                logs["grad_norm"] = float(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logs["lr"] = self.scheduler.get_last_lr()[0]
        logs = {**self._gather_means(logs), **self._gather_ratios(parts)}
        for name, fn in self.derived_metrics.items():
            try:
                logs[name] = fn(logs)
            except KeyError:  # a metric it needs is absent this step
                pass
        return logs

    def _gather_ratios(self, parts: dict[str, tuple[float, float]]) -> dict[str, float]:
        names = sorted(parts)
        if self.world_size > 1 and names:  # every process emits the same names, possibly with count 0
            values = torch.tensor([parts[n] for n in names], device=self.device, dtype=torch.float64)
            parts = dict(zip(names, self.accelerator.reduce(values, reduction="sum").tolist()))
        return {name: s / c for name, (s, c) in parts.items() if c > 0}

    def _gather_means(self, logs: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not logs:
            return logs
        names = sorted(logs)
        values = torch.tensor([logs[n] for n in names], device=self.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    def _diverged(self, value: float, what: str = "loss") -> None:
        last = self.latest_checkpoint()
        kept = f"last good checkpoint kept: {last}" if last else "no checkpoint was written before it"
        raise TrainingDiverged(f"{what} became {value} at step {self.step + 1}; stopping ({kept})")

    # ------------------------------------------------------------------------------------- offline training
    def fit(
        self,
        examples: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
        count_fn: Callable[[Any], int],
        eval_fn: Callable[[], dict[str, float]] | None = None,
        shown: Sequence[str] = (),
    ) -> dict[str, float]:
        """Train on a fixed dataset: a fresh seeded shuffle per epoch, ``total_steps`` optimizer steps. ``eval_fn``
        (held-out metrics) runs before training (step 0; not when resuming), every ``--eval-steps`` steps and after;
        the ``shown`` metrics of the first and last are printed. Returns the last held-out metrics."""
        if eval_fn is not None and not self.cfg.resume:
            self.held_out(eval_fn, "before", shown, step=0)
        global_batch = self.cfg.world_batch * self.world_size
        if len(examples) < global_batch:
            raise ValueError(
                f"{len(examples)} examples cannot fill one global batch of {global_batch} "
                f"(batch_size {self.cfg.batch_size} x grad_accum {self.cfg.grad_accum} x {self.world_size} processes)"
            )
        steps_per_epoch = len(examples) // global_batch
        if self.cfg.resume:
            self.resume()
        self.start_progress()
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, steps_per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            chosen = order[index * global_batch : (index + 1) * global_batch].tolist()
            mine = chosen[self.rank * self.cfg.world_batch : (self.rank + 1) * self.cfg.world_batch]
            micro = [
                collate([examples[i] for i in mine[k : k + self.cfg.batch_size]])
                for k in range(0, len(mine), self.cfg.batch_size)
            ]
            logs = self.update(micro, loss_fn, count_fn)
            logs["epoch"] = self.step / steps_per_epoch
            # the last step's weights are evaluated once, by the pass after training
            if eval_fn is not None and self.cfg.eval_steps and self.step % self.cfg.eval_steps == 0 \
                    and self.step < self.total_steps:
                logs.update(eval_fn())
            self.log(logs)
            self.maybe_save()
        self.close_progress()
        return self.held_out(eval_fn, "after", shown) if eval_fn is not None else {}

    def held_out(self, eval_fn: Callable[[], dict[str, float]], when: str, shown: Sequence[str],
                 step: int | None = None) -> dict[str, float]:
        """Run ``eval_fn``, log its metrics (at ``step``, default the current one) and print the ``shown`` ones."""
        metrics = eval_fn()
        self.log(metrics, step=step)
        if self.is_main and shown:
            print(f"held-out {when}: ".ljust(17) + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics))
        return metrics

    # -------------------------------------------------------------------------------------------- logging
    def start_progress(self) -> None:
        if self.is_main and self.cfg.progress:
            self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.step if step is None else step
        if self._bar is not None:
            self._bar.n = step
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "reward/mean", "accuracy", "kl", "eval/loss")}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
        if not self.is_main or (step % max(1, self.cfg.log_steps) and step != self.total_steps):
            return
        if self.device.type == "cuda":  # the allocator's running peak: free to read
            metrics = {**metrics, "gpu_mem_peak_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        record = {"step": step, "time": round(time.time() - self._started, 3), **metrics}
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)

    # ----------------------------------------------------------------------------------------- checkpoints
    def maybe_save(self) -> None:
        if self.cfg.save_steps and self.step % self.cfg.save_steps == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    def latest_checkpoint(self) -> Path | None:
        found = [p for p in self.output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None

    def _gather(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Whole weights when they are sharded (FSDP, DeepSpeed ZeRO-3), else None. A collective: every process
        calls it, and the main process gets full tensors on the CPU to write a plain Hugging Face checkpoint."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            full = self.accelerator.get_state_dict(self.module)  # gathers ZeRO-3 partitions (zero3_save_16bit_model)
            named = dict(self.accelerator.unwrap_model(self.module).named_modules())
            parts = {"model": self.model, **self.extra_modules}
            prefixes = {key: next(name for name, m in named.items() if m is part) for key, part in parts.items()}
            return {key: {k[len(pre) + 1 if pre else 0 :]: v for k, v in full.items() if not pre or k.startswith(pre + ".")}
                    for key, pre in prefixes.items()}
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        parts = {"model": self.model, **self.extra_modules}
        return {key: _without_aliases(part, get_model_state_dict(part, options=options)) for key, part in parts.items()}

    def _optimizer_state(self) -> dict:
        """The optimizer state; under FSDP gathered whole (a collective), so a checkpoint does not depend on the
        number of processes that wrote it."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, self.optimizer.optimizer, options=options)

    def _write_model(self, directory: Path, gathered: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        weights = None if gathered is None else gathered["model"]
        model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        for name, module in self.extra_modules.items():
            state = module.state_dict() if gathered is None else gathered[name]
            save_file({k: v.detach().contiguous() for k, v in state.items()}, directory / f"{name}.safetensors")
        (directory / "alignkit_config.json").write_text(json.dumps(self.run_config, indent=2, default=str))

    def save_checkpoint(self) -> Path:
        """checkpoint-N/: HF-format model + tokenizer, and trainer state (optimizer, scheduler, RNG, step).
        Written to a temporary directory and renamed, so a killed run never leaves half a checkpoint."""
        target = self.output_dir / f"checkpoint-{self.step}"
        self.accelerator.wait_for_everyone()
        self.reshard()  # the sharded parameters are the ones the optimizer updates: read those
        gathered, optimizer_state = self._gather(), self._optimizer_state()  # collectives under FSDP
        if self.is_main:

            def write(tmp: Path) -> None:
                self._write_model(tmp, gathered)
                torch.save(
                    {
                        "step": self.step,
                        "optimizer": optimizer_state,
                        "scheduler": self.scheduler.state_dict(),
                        "rng": _rng_state(),
                    },
                    tmp / "trainer_state.pt",
                )

            _atomic_dir(target, write)
            self._rotate()
        self.accelerator.wait_for_everyone()
        return target

    def _rotate(self) -> None:
        found = sorted(
            (p for p in self.output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
            key=lambda p: int(p.name.split("-")[1]),
        )
        for old in found[: max(0, len(found) - self.cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self) -> Path:
        target = self.output_dir / "final"
        self.accelerator.wait_for_everyone()
        self.reshard()
        gathered = self._gather()
        if self.is_main:
            if target.exists():
                shutil.rmtree(target)
            _atomic_dir(target, lambda tmp: self._write_model(tmp, gathered))
        self.accelerator.wait_for_everyone()
        return target

    def resume(self) -> int:
        """Restore weights, optimizer, scheduler, RNG and step from the newest checkpoint (if any)."""
        checkpoint = self.latest_checkpoint()
        self.reshard()  # weights are loaded into the shards; a gathered copy would be left stale
        if checkpoint is None:
            if self.is_main:
                print(f"alignkit: no checkpoint in {self.output_dir}; starting from scratch", file=sys.stderr)
            return self.step
        model = self.accelerator.unwrap_model(self.model)
        if (checkpoint / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        else:
            weights = {}
            for shard in sorted(checkpoint.glob("model*.safetensors")):
                weights.update(load_file(shard))
            if self.sharded:
                _load_full(self.model, weights)
            else:
                missing, unexpected = unwrap(model).load_state_dict(weights, strict=False)
                tied = {"lm_head.weight"}
                if unexpected or set(missing) - tied:
                    raise RuntimeError(f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, module in self.extra_modules.items():
            extra = load_file(checkpoint / f"{name}.safetensors")
            if self.sharded:
                _load_full(module, extra)
            else:
                module.load_state_dict(extra)
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        # an FSDP checkpoint keys optimizer state by parameter name: it loads under FSDP and in plain processes alike
        by_name = any(isinstance(k, str) for k in state["optimizer"].get("state", {}))
        if self.sharded or by_name:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.module, self.optimizer.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        if self.is_main:
            self._trim_metrics()
            print(f"alignkit: resumed from {checkpoint} at step {self.step}", file=sys.stderr)
        return self.step

    def _trim_metrics(self) -> None:
        """Drop metrics.jsonl records logged after the checkpoint's step: those steps run again, and each step
        must have one record. Lines cut short by a kill go too. Rewritten atomically."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= self.step:
                kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def finish(self, what: str = "model") -> Path:
        path = self.save_final()
        self.accelerator.end_training()
        if self.is_main:
            print(f"{what} saved to {path}")
        return path


def batch_tokens(batch: Any, depth: int = 0) -> int:
    """Tokens a training micro-batch feeds the model: the sum of its padding mask ``attention_mask``, or
    ``input_ids.numel()`` for packed rows (whose attention mask, if any, is a block mask of another shape), found by
    name in the dicts and dataclasses (e.g. a Rollout) the trainers use as batches."""
    get = batch.get if isinstance(batch, dict) else (lambda name: getattr(batch, name, None))
    mask, ids = get("attention_mask"), get("input_ids")
    if isinstance(ids, torch.Tensor):
        return int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else ids.numel()
    if depth >= 2:
        return 0
    children = batch.values() if isinstance(batch, dict) else [getattr(batch, f) for f in getattr(batch, "__dataclass_fields__", ())]
    return sum(batch_tokens(c, depth + 1) for c in children if isinstance(c, dict) or hasattr(c, "__dataclass_fields__"))


def resolve_precision(mixed_precision: str) -> str:
    """accelerate's mixed_precision value ("bf16" or "no") for our flag value (bf16, no, auto)."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be auto, bf16 or no, got {mixed_precision!r}")
    if mixed_precision == "auto":
        return "bf16" if bf16_is_fast() else "no"
    return mixed_precision


# ------------------------------------------------------------------------------- FSDP2 on CPU (gloo processes)
def _fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """An FSDP launch (``accelerate launch --config_file fsdp2.yaml`` sets ACCELERATE_USE_FSDP) on CPU processes.

    accelerate builds FSDP only on accelerators: with gloo processes its state stays MULTI_CPU and it would wrap
    the model in DDP. torch's FSDP2 itself runs on CPU, so there the engine applies it (``shard_fsdp2``) and
    accelerate prepares only the optimizer: the same config file trains on a CPU box and on GPUs."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    return requested and accelerator.distributed_type == DistributedType.MULTI_CPU


def shard_fsdp2(module: torch.nn.Module, reshard_root: bool | None = None) -> None:
    """torch FSDP2 (``fully_shard``) as accelerate's TRANSFORMER_BASED_WRAP does it: every transformer block (the
    classes in ``module._no_split_modules``) is one unit, gathered just before its forward and backward and freed
    after; the root unit holds the rest (embeddings, tied head, value head). Parameters become DTensors sharded on
    dim 0 over the processes, and gradients are reduce-scattered (averaged), as DDP averages them.
    ``reshard_root`` None keeps the root gathered from forward to backward (training); True frees it after each
    forward (a frozen module: no backward comes)."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(module, "_no_split_modules", None) or [])
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub)
    fully_shard(module, reshard_after_forward=reshard_root)


def _fsdp_units(*roots: torch.nn.Module) -> list[torch.nn.Module]:
    """Every FSDP2 unit (``fully_shard``-ed module) under ``roots``, each once."""
    from torch.distributed.fsdp import FSDPModule

    units: dict[int, torch.nn.Module] = {}
    for root in roots:
        for sub in root.modules():
            if isinstance(sub, FSDPModule):
                units.setdefault(id(sub), sub)
    return list(units.values())


def _without_aliases(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of a shared parameter (a tied lm_head): gathered copies no longer share storage, so
    save_pretrained could not see the tie and would write the head twice."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        first.setdefault(id(param), name)
    return {k: v for k, v in state.items() if k not in aliases}


def _load_full(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load whole (unsharded) tensors into a module whose parameters are FSDP shards: each process keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: a tied head is saved once (as the embedding), like load_state_dict above
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _cpu_only() -> bool:
    # accelerate only sets up multi-process CPU training (gloo) when told it runs on the CPU
    return not torch.cuda.is_available()


def distributed_state() -> PartialState:
    """The process group (initialised on first use: gloo on CPU, NCCL on GPUs)."""
    return PartialState(cpu=_cpu_only())


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _flat_scalars(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
    return flat


def default_threads() -> None:
    """One thread per process when several share the CPU (torchrun/accelerate set WORLD_SIZE)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MB (a step's logits chunks, the LM head's and embedding's
    gradients, activations) with a fresh ``mmap`` and unmaps it on free, so each training step faults every page of
    them in again: on the 2-core machine that was ~100k page faults and 0.3-0.6 s of kernel time per SmolLM2 DPO
    step, all of it repeated work. With mmap off and trimming at 2 GB the freed blocks stay in the heap and the next
    step reuses them (0 faults per steady step, the same peak RSS). A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass


class _EmbeddingRows(torch.autograd.Function):
    """F.embedding whose weight gradient is added, row by row, into ``weight.grad`` once the backward has finished
    (after the tied head's dense gradient has landed there), instead of flowing through autograd."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight, flat, rows = ctx.weight, ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            keep = flat != ctx.padding_idx
            flat, rows = flat[keep], rows[keep]

        def add_rows() -> None:
            if weight.grad is None:  # the head took no part in this backward
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, flat, rows.to(weight.grad.dtype))

        torch.autograd.Variable._execution_engine.queue_callback(add_rows)
        return None, None, None


def embedding_rows_into_tied_head(model: torch.nn.Module) -> bool:
    """Add a tied input embedding's gradient (its weight is the LM head's) straight into the head's gradient.

    The dense embedding backward zero-fills a vocab x hidden buffer (113 MB for SmolLM2; ~130 ms of a 2.6 s DPO
    step on 2 cores), scatters the batch's few hundred rows into it, and autograd adds it to the head's dense
    gradient; a sparse gradient avoids the fill, but autograd then clones the head's gradient to add it. Here the
    lookup's backward queues an ``index_add_`` of its rows into ``weight.grad``, run when the backward finishes, so
    neither buffer exists. For training through ``backward()`` in one process (no DDP/FSDP gradient hooks to see
    the weight's gradient early). True when switched on."""
    lm = unwrap(model)
    embedding, head = lm.get_input_embeddings(), getattr(lm, "get_output_embeddings", lambda: None)()
    if type(embedding) is not torch.nn.Embedding or head is None or head.weight is not embedding.weight:
        return False
    if not embedding.weight.requires_grad or isinstance(embedding.weight, DTensor):
        return False
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return False
    embedding.__class__ = _RowsIntoTiedHead  # a copy (e.g. a frozen reference) keeps its own weight and behaviour
    return True


class _RowsIntoTiedHead(torch.nn.Embedding):
    """An ``nn.Embedding`` whose training lookups go through ``_EmbeddingRows`` (see embedding_rows_into_tied_head)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _EmbeddingRows.apply(ids, self.weight, self.padding_idx)
        return super().forward(ids)


def total_steps_for(cfg: TrainConfig, n_examples: int, world_size: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps_per_epoch = max(1, n_examples // (cfg.world_batch * world_size))
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


__all__ = ["Engine", "TrainConfig", "TrainingDiverged", "default_threads", "distributed_state", "keep_freed_memory", "embedding_rows_into_tied_head",
           "total_steps_for"]
