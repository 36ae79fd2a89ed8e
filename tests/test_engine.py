"""The shared engine: invariances (accumulation = large batch, resume = uninterrupted, 2 processes = 1),
NaN handling, checkpoint layout and rotation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from alignkit.algos.sft import count_targets, sft_loss
from alignkit.data import Record, build_examples, pad_sft, sft_example
from alignkit.engine import Engine, TrainConfig, TrainingDiverged
from alignkit.logprobs import LogprobModel
from alignkit.models import load_model

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]


def _examples(tokenizer):
    records = [Record(r, f"rows:{i}") for i, r in enumerate(ROWS)]
    return build_examples(records, sft_example, tokenizer)[0]


def _train(tiny_model_dir, tmp_path, **overrides) -> tuple[dict[str, torch.Tensor], Engine]:
    model, tokenizer = load_model(str(tiny_model_dir))
    cfg = TrainConfig(output_dir=str(tmp_path), lr=1e-2, mixed_precision="no", progress=False, report_to="none", **overrides)
    engine = Engine(cfg, model, tokenizer, total_steps=cfg.max_steps, train_module=LogprobModel(model))
    engine.fit(_examples(tokenizer), partial(pad_sft, pad_id=tokenizer.pad_token_id), sft_loss, count_targets)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, engine


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulation_equals_large_batch(tiny_model_dir, tmp_path):
    """batch 8 x 1 and batch 2 x 4 micro-batches see the same examples and normalise by the same token count,
    so the updates agree to float rounding (the examples have different lengths, so a per-micro-batch mean
    would not)."""
    big, _ = _train(tiny_model_dir, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3)
    small, _ = _train(tiny_model_dir, tmp_path / "b", batch_size=2, grad_accum=4, max_steps=3)
    start, _ = load_model(str(tiny_model_dir))
    assert _max_diff(big, start.state_dict()) > 1e-3  # training moved the weights
    assert _max_diff(big, small) < 2e-5


def test_held_out_runs_before_every_eval_steps_and_once_after(tiny_model_dir, tmp_path, capsys):
    """--eval-steps 2 over 4 steps: held-out passes at steps 0, 2 and 4, the last one only once (after training),
    each logged at its step and the first and last printed."""
    model, tokenizer = load_model(str(tiny_model_dir))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, eval_steps=2, mixed_precision="no",
                      progress=False, report_to="none")
    engine = Engine(cfg, model, tokenizer, total_steps=4, train_module=LogprobModel(model))
    calls = []

    def held_out() -> dict[str, float]:
        calls.append(engine.step)
        return {"eval/loss": float(len(calls))}

    last = engine.fit(_examples(tokenizer), partial(pad_sft, pad_id=tokenizer.pad_token_id), sft_loss, count_targets,
                      held_out, shown=("eval/loss",))
    assert calls == [0, 2, 4] and last == {"eval/loss": 3.0}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r] == [(0, 1.0), (2, 2.0), (4, 3.0)]
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["held-out before: eval/loss 1.0000", "held-out after:  eval/loss 3.0000"]


def test_checkpoints_rotate_and_final_loads(tiny_model_dir, tmp_path):
    _, engine = _train(tiny_model_dir, tmp_path, batch_size=4, max_steps=5, save_steps=1, save_total_limit=2)
    engine.finish()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-3", "checkpoint-4", "final", "metrics.jsonl"]  # no temporary leftovers
    state = torch.load(tmp_path / "checkpoint-4" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and "optimizer" in state and "rng" in state
    reloaded, _ = load_model(str(tmp_path))  # a run directory resolves to its final model
    trained = engine.model.state_dict()
    assert all(torch.equal(reloaded.state_dict()[k], trained[k]) for k in trained)


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=4, save_steps=2, mixed_precision="no",
                      progress=False, report_to="none")
    engine = Engine(cfg, model, tokenizer, total_steps=6, train_module=LogprobModel(model))

    def exploding_loss(module, batch):
        loss, metrics = sft_loss(module, batch)
        return (loss * float("nan") if engine.step >= 3 else loss), metrics

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*checkpoint-2"):
        engine.fit(_examples(tokenizer), partial(pad_sft, pad_id=tokenizer.pad_token_id), exploding_loss, count_targets)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    assert not (tmp_path / "final").exists()


def _cli(*args: str, env_extra: dict | None = None, launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = (launcher or [sys.executable, "-m"]) + ["alignkit.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sft_args(model_dir, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--lr", "5e-3",
            "--mixed-precision", "no", "--no-progress", "--report-to", "none", *extra]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_resume_after_kill_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS * 4)
    steps = ["--max-steps", "14", "--batch-size", "4", "--save-steps", "2"]
    full = _cli(*_sft_args(tiny_model_dir, data, tmp_path / "full", *steps))
    killed = _cli(*_sft_args(tiny_model_dir, data, tmp_path / "killed", *steps))
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("checkpoint-*")) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _cli(*_sft_args(tiny_model_dir, data, tmp_path / "killed", *steps, "--resume"))
    out_resumed, out_full = resumed.communicate()[0], full.communicate()[0]
    assert resumed.returncode == 0 and full.returncode == 0, out_resumed + out_full
    assert "resumed from" in out_resumed
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a), _max_diff(a, b)


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    """DDP over 2 gloo processes with batch 2 each = 1 process with batch 4 (same global batch)."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    one = _cli(*_sft_args(tiny_model_dir, data, tmp_path / "one", "--max-steps", "3", "--batch-size", "4"))
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", "-m"]
    two = _cli(*_sft_args(tiny_model_dir, data, tmp_path / "two", "--max-steps", "3", "--batch-size", "2"), launcher=torchrun)
    out_one, out_two = one.communicate()[0], two.communicate()[0]
    assert one.returncode == 0, out_one
    assert two.returncode == 0, out_two
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert _max_diff(a, start) > 1e-3
    assert _max_diff(a, b) < 1e-5


FAULTS_SCRIPT = """
import resource, torch
from alignkit.engine import keep_freed_memory

def faults_of_a_64mb_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.ones(16 * 2**20)
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_a_64mb_buffer() for _ in range(3)]
keep_freed_memory()
kept = [faults_of_a_64mb_buffer() for _ in range(12)]  # the heap settles within a few allocations
print(min(default), max(kept[-3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_faulting_its_pages_in_again():
    """glibc serves a 64 MB buffer with a fresh mmap each time (16,384 pages faulted in per allocation); after
    keep_freed_memory a repeated allocation reuses a freed heap block."""
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    assert default >= 16_000
    assert kept < 200


def test_tied_embedding_rows_gradient_equals_the_dense_one(tiny_model_dir):
    """The tiny llama ties its embedding to its head. With the lookup's rows added into the head's gradient after
    the backward, the weight's gradient equals the dense backward's: through the fused head, accumulated over two
    backwards, and for a loss that never reaches the head."""
    from alignkit.engine import embedding_rows_into_tied_head

    dense, _ = load_model(str(tiny_model_dir))
    rows, tokenizer = load_model(str(tiny_model_dir))
    assert embedding_rows_into_tied_head(rows) and not embedding_rows_into_tied_head(rows)  # once only
    assert rows.lm_head.weight is rows.get_input_embeddings().weight
    ids = torch.randint(0, rows.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = tokenizer.pad_token_id  # a padding_idx row, if the embedding has one, gets no gradient
    mask = torch.ones_like(ids)
    for model in (dense, rows):
        LogprobModel(model)(ids, mask).sum().backward()
        LogprobModel(model)(ids.flip(1), mask).sum().backward()  # accumulated into the existing gradient
    weight = rows.get_input_embeddings().weight
    torch.testing.assert_close(weight.grad, dense.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6)
    for model in (dense, rows):
        model.zero_grad(set_to_none=True)
        model.model(input_ids=ids).last_hidden_state.square().mean().backward()  # the head takes no part
    torch.testing.assert_close(weight.grad, dense.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6)
    looked_up = set(ids.unique().tolist()) - {rows.get_input_embeddings().padding_idx}
    assert set((weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()) == looked_up
    with torch.no_grad():  # the frozen path is the plain lookup
        torch.testing.assert_close(rows.model(input_ids=ids).last_hidden_state, dense.model(input_ids=ids).last_hidden_state)
    import copy

    frozen = copy.deepcopy(rows).requires_grad_(False)  # a reference copied after the switch looks up its own weight
    with torch.no_grad():
        frozen.get_input_embeddings().weight.zero_()
        assert frozen.get_input_embeddings()(ids).abs().sum() == 0 and rows.get_input_embeddings()(ids).abs().sum() > 0
