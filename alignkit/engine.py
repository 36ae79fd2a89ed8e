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
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import send_to_device, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit.config import arg
from alignkit.models import _atomic_dir, bf16_is_fast, unwrap


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


@dataclass
class TrainConfig:
    """Flags every trainer shares."""

    output_dir: str = arg("runs/alignkit", "checkpoints go in checkpoint-N/, the final model in final/")
    max_steps: int = arg(-1, "optimizer steps; -1 derives them from epochs")
    epochs: float = arg(1.0, "passes over the data when max_steps is -1")
    batch_size: int = arg(8, "examples per process per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(0, "linear warmup steps; overrides warmup_ratio when > 0")
    warmup_ratio: float = arg(0.0, "fraction of the steps spent warming up")
    schedule: str = arg("cosine", "learning-rate decay after warmup: cosine, linear or constant")
    max_grad_norm: float = arg(1.0, "gradient clipping norm; 0 disables")
    mixed_precision: str = arg("auto", "bf16 (autocast, fp32 master weights), no, or auto: bf16 where the hardware has it")
    seed: int = arg(0, "seed for initialisation, shuffling and sampling")
    save_steps: int = arg(0, "write a checkpoint every N steps; 0: only the final model")
    save_total_limit: int = arg(2, "checkpoints kept, oldest removed first")
    log_steps: int = arg(1, "log metrics every N steps")
    eval_steps: int = arg(0, "evaluate every N steps; 0: before and after training only")
    resume: bool = arg(False, "continue from the newest checkpoint in output_dir")
    report_to: str = arg("tensorboard", "comma-separated trackers: tensorboard, wandb, mlflow, none")
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
        self.output_dir = Path(cfg.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        train_module = train_module if train_module is not None else model
        params = [p for p in train_module.parameters() if p.requires_grad]
        # the fused kernel does one pass over each parameter instead of several elementwise ops
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.module, self.optimizer = self.accelerator.prepare(train_module, optimizer)
        self.params = params
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, total_steps))
        self.step = 0
        self.run_config = {"train": asdict(cfg), **(run_config or {})}
        if self.accelerator.trackers:
            self.accelerator.init_trackers("alignkit", config=_flat_scalars(self.run_config))
        self._bar = None
        self._started = time.time()

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
        """
        local = torch.tensor(float(sum(count_fn(b) for b in micro_batches)), device=self.device)
        total = self.accelerator.reduce(local, reduction="sum").item() if self.world_size > 1 else local.item()
        # DDP averages gradients over processes, hence the world_size factor
        scale = self.world_size / max(total, 1.0)
        sums: dict[str, float] = {}
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
                sums[name] = sums.get(name, 0.0) + float(value)
        logs = {name: value / len(micro_batches) for name, value in sums.items()}
        if self.cfg.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                self._diverged(float(grad_norm), what="gradient norm")
            logs["grad_norm"] = float(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return self._gather_means(logs)

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
    ) -> dict[str, float]:
        """Train on a fixed dataset: a fresh seeded shuffle per epoch, ``total_steps`` optimizer steps."""
        global_batch = self.cfg.world_batch * self.world_size
        if len(examples) < global_batch:
            raise ValueError(
                f"{len(examples)} examples cannot fill one global batch of {global_batch} "
                f"(batch_size {self.cfg.batch_size} x grad_accum {self.cfg.grad_accum} x {self.world_size} processes)"
            )
        steps_per_epoch = len(examples) // global_batch
        if self.cfg.resume:
            self.resume()
        last_eval: dict[str, float] = {}
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
            if eval_fn is not None and self.cfg.eval_steps and self.step % self.cfg.eval_steps == 0:
                last_eval = eval_fn()
                logs.update(last_eval)
            self.log(logs)
            self.maybe_save()
        self.close_progress()
        return last_eval

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

    def _write_model(self, directory: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(directory, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        for name, module in self.extra_modules.items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, directory / f"{name}.safetensors")
        (directory / "alignkit_config.json").write_text(json.dumps(self.run_config, indent=2, default=str))

    def save_checkpoint(self) -> Path:
        """checkpoint-N/: HF-format model + tokenizer, and trainer state (optimizer, scheduler, RNG, step).
        Written to a temporary directory and renamed, so a killed run never leaves half a checkpoint."""
        target = self.output_dir / f"checkpoint-{self.step}"
        self.accelerator.wait_for_everyone()
        if self.is_main:

            def write(tmp: Path) -> None:
                self._write_model(tmp)
                torch.save(
                    {
                        "step": self.step,
                        "optimizer": self.optimizer.state_dict(),
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
        if self.is_main:
            if target.exists():
                shutil.rmtree(target)
            _atomic_dir(target, self._write_model)
        self.accelerator.wait_for_everyone()
        return target

    def resume(self) -> int:
        """Restore weights, optimizer, scheduler, RNG and step from the newest checkpoint (if any)."""
        checkpoint = self.latest_checkpoint()
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
            missing, unexpected = unwrap(model).load_state_dict(weights, strict=False)
            tied = {"lm_head.weight"}
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, module in self.extra_modules.items():
            module.load_state_dict(load_file(checkpoint / f"{name}.safetensors"))
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        if self.is_main:
            print(f"alignkit: resumed from {checkpoint} at step {self.step}", file=sys.stderr)
        return self.step

    def finish(self) -> Path:
        path = self.save_final()
        self.accelerator.end_training()
        return path


def resolve_precision(mixed_precision: str) -> str:
    """accelerate's mixed_precision value ("bf16" or "no") for our flag value (bf16, no, auto)."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be auto, bf16 or no, got {mixed_precision!r}")
    if mixed_precision == "auto":
        return "bf16" if bf16_is_fast() else "no"
    return mixed_precision


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


def total_steps_for(cfg: TrainConfig, n_examples: int, world_size: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps_per_epoch = max(1, n_examples // (cfg.world_batch * world_size))
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


__all__ = ["Engine", "TrainConfig", "TrainingDiverged", "default_threads", "distributed_state", "total_steps_for"]
