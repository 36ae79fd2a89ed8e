"""Scale-out: the shipped accelerate configs parse as `accelerate launch` reads them; FSDP2 over 2 gloo CPU
processes trains to the weights of 1 process and saves/resumes Hugging Face checkpoints; statistics that are
global by definition (REINFORCE++ / PPO whitening) come out the same over 2 processes as over 1; and
bench/gpu_check.sh stops cleanly on a machine without a GPU.

Run as a script (under torchrun) this file is the worker of the whitening test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "examples" / "accelerate"
BIN = Path(sys.executable).parent


def _whitening_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """6 rows x 5 tokens of returns with ragged masks (rows of 1..5 tokens); NaN on padding, as log-probs have."""
    g = torch.Generator().manual_seed(7)
    returns = torch.randn(6, 5, generator=g) * 3 + 1
    lengths = torch.tensor([1, 5, 3, 2, 4, 5])
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    return returns.masked_fill(mask == 0, float("nan")), mask


# rank 0 holds rows 0-1, rank 1 rows 2-5: unequal shares, so per-process counts must be summed, not averaged
SPLIT = [slice(0, 2), slice(2, 6)]


def _worker(out_dir: str) -> None:
    from alignkit import losses
    from alignkit.engine import Engine, TrainConfig

    cfg = TrainConfig(output_dir=out_dir, mixed_precision="no", progress=False, report_to="none")
    engine = Engine(cfg, torch.nn.Linear(2, 2), None, total_steps=1)
    returns, mask = _whitening_batch()
    part = SPLIT[engine.rank]
    result = {
        "reinforce_pp": losses.reinforce_pp_advantages(returns[part], mask[part], all_sum=engine.all_sum),
        "rewards": losses.masked_whiten(returns[part], mask[part], shift_mean=False, all_sum=engine.all_sum),
    }
    torch.save(result, Path(out_dir) / f"rank{engine.rank}.pt")
    # both results are on disk after the barrier; then leave without the interpreter's teardown, where the gloo
    # group's destructor once aborted a rank ("terminate called without an active exception") and, when the group
    # was destroyed first, once hung
    engine.accelerator.wait_for_everyone()
    os._exit(0)


def test_whitening_over_two_processes_equals_one(tmp_path):
    from conftest import free_port

    from alignkit import losses

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), __file__, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    returns, mask = _whitening_batch()
    whole = {"reinforce_pp": losses.reinforce_pp_advantages(returns, mask),
             "rewards": losses.masked_whiten(returns, mask, shift_mean=False)}
    for name, expected in whole.items():
        got = torch.cat([p[name] for p in parts])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # whitening each process's share on its own would give something else (so the check above can fail)
    local = torch.cat([losses.reinforce_pp_advantages(returns[s], mask[s]) for s in SPLIT])
    assert (local - whole["reinforce_pp"]).abs().max() > 0.1
    # and the statistics are right: over the 20 real tokens mean 0, unbiased variance 1
    adv = whole["reinforce_pp"]
    assert abs(float(losses.masked_mean(adv, mask))) < 1e-6
    assert abs(float(losses.masked_var(adv, mask)) - 1.0) < 1e-5


def test_global_moments_hand_computed():
    """Entries 1, 2, 4 (one process) or 1, 2 | 4 (two, summed by a stand-in all_sum over a list of shares):
    mean 7/3, unbiased variance ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = 7/3."""
    from alignkit.losses import global_moments

    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mean, var = global_moments(values, mask)
    assert abs(float(mean) - 7 / 3) < 1e-6 and abs(float(var) - 7 / 3) < 1e-6
    # the share of the other "process" (row 1: Σx = 4, Σx² = 16, n = 1) is added by all_sum, as an all-reduce would
    x = torch.tensor([4.0], dtype=torch.float64)
    share = torch.stack([x.sum(), (x * x).sum(), torch.tensor(1.0, dtype=torch.float64)])
    mean, var = global_moments(values[:1], mask[:1], all_sum=lambda t: t + share)
    assert abs(float(mean) - 7 / 3) < 1e-6 and abs(float(var) - 7 / 3) < 1e-6


# ------------------------------------------------------------------------------------------ accelerate configs
def test_accelerate_configs_parse_as_launch_reads_them(tmp_path):
    """Each shipped file goes through accelerate's own config loader (which rejects unknown keys) and the launch
    command's validation; the environment its launcher would give the processes carries our settings."""
    import pytest
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    expected = {
        "ddp.yaml": ("MULTI_GPU", {"ACCELERATE_MIXED_PRECISION": "no"}),
        "two_nodes.yaml": ("MULTI_GPU", {}),
        "fsdp2.yaml": ("FSDP", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true"}),
        "zero2.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                                     "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": None}),
        "zero3.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                     "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
                                     "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"}),
    }
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (kind, env) in expected.items():
        path = str(CONFIGS / name)
        loaded = load_config_from_file(path)
        assert loaded.distributed_type.value == kind
        # accelerate copies the nested sections onto launch options without checking their names: we do
        known = vars(launch_command_parser().parse_args(["x"]))
        for key in [*loaded.fsdp_config, *loaded.deepspeed_config]:
            assert key in known, f"{name}: {key} is no accelerate launch option"
        args = launch_command_parser().parse_args(["--config_file", path, "-m", "alignkit.cli", "sft", "--max-steps", "1"])
        args = _validate_launch_command(args)[0]
        assert args.training_script_args == ["sft", "--max-steps", "1"]
        if kind == "DEEPSPEED":
            args.deepspeed_fields_from_accelerate_config = ""  # set by launch_command from the file's keys
            built = prepare_deepspeed_cmd_env(args)[1]
        else:
            built = prepare_multi_gpu_env(args)
        assert {k: built.get(k) for k in env} == env, name
        if name == "two_nodes.yaml":
            assert (args.num_machines, args.num_processes, args.main_process_ip) == (2, 16, "10.0.0.1")
    misspelt = tmp_path / "bad.yaml"
    misspelt.write_text((CONFIGS / "ddp.yaml").read_text().replace("num_processes:", "num_process:"))
    with pytest.raises(ValueError, match="unknown keys.*num_process"):
        load_config_from_file(str(misspelt))


# --------------------------------------------------------------------------------------------- FSDP on CPU
ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]


def _sft(model_dir, data, out, launcher, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--lr", "5e-3",
            "--mixed-precision", "no", "--no-progress", "--report-to", "none", "--max-steps", "3", *extra]
    return subprocess.Popen([*launcher, "alignkit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _done(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return out


def test_fsdp_on_cpu_equals_one_process_and_resumes(tiny_model_dir, tmp_path):
    """`accelerate launch --config_file examples/accelerate/fsdp2.yaml` with 2 gloo processes x batch 2 trains
    to the weights of 1 process x batch 4; its checkpoints are whole HF models; --resume continues exactly."""
    from conftest import write_jsonl
    from safetensors.torch import load_file

    from alignkit.models import load_model

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    fsdp = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "fsdp2.yaml"), "--num_processes", "2",
            "--main_process_port", "29533", "-m"]
    one = _sft(tiny_model_dir, data, tmp_path / "one", [sys.executable, "-m"], "--batch-size", "4")
    two = _sft(tiny_model_dir, data, tmp_path / "two", fsdp, "--batch-size", "2", "--save-steps", "2")
    _done(one), _done(two)
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "two"))
    start = load_file(tiny_model_dir / "model.safetensors")
    assert sorted(a) == sorted(b) == sorted(start)  # whole tensors, tied head written once, as save_pretrained does
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # the FSDP checkpoint is a plain HF model
    model, _ = load_model(str(tmp_path / "two" / "checkpoint-2"))
    ckpt = load_file(tmp_path / "two" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], ckpt[k]) for k in ckpt)
    # resume from it under FSDP: the same final weights as the uninterrupted run; and in 1 process x batch 4 (the
    # checkpoint does not depend on the number of processes that wrote it): `one`'s weights
    for run in ("resumed", "single"):
        (tmp_path / run).mkdir()
        shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / run / "checkpoint-2")
    fsdp[fsdp.index("29533")] = "29534"
    resumed = _sft(tiny_model_dir, data, tmp_path / "resumed", fsdp, "--batch-size", "2", "--save-steps", "2", "--resume")
    single = _sft(tiny_model_dir, data, tmp_path / "single", [sys.executable, "-m"], "--batch-size", "4", "--resume")
    assert "resumed from" in _done(resumed) and "resumed from" in _done(single)
    c = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    d = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert max(float((a[k] - d[k]).abs().max()) for k in a) < 1e-5


# ---------------------------------------------------------------------------------------------- GPU check
def test_batch_tokens_counts_what_each_trainer_feeds():
    """The engine logs `tokens` per step (gpu_check's tokens/s) from any trainer's micro-batch shape."""
    from dataclasses import dataclass

    from alignkit.engine import batch_tokens
    from alignkit.rollout import Rollout

    padded = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert batch_tokens(padded) == 5
    assert batch_tokens({"input_ids": torch.zeros(1, 7), "position_ids": torch.zeros(1, 7)}) == 7  # packed rows
    block = torch.ones(1, 1, 7, 7)  # a packed batch's block-diagonal attention mask is no padding mask
    assert batch_tokens({"input_ids": torch.zeros(1, 7), "attention_mask": block}) == 7
    rollout = Rollout(prompt_ids=torch.zeros(2, 3, dtype=torch.long), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                      response_ids=torch.zeros(2, 2, dtype=torch.long), response_mask=torch.tensor([[1, 1], [1, 0]]),
                      logprobs=torch.zeros(2, 2), ended_with_eos=torch.tensor([True, False]))

    @dataclass
    class Batch:  # GRPO's shape: a dataclass holding a Rollout
        rollout: Rollout
        advantages: torch.Tensor

    assert batch_tokens(Batch(rollout, torch.zeros(2))) == 8  # prompt 2 + 3, response 2 + 1
    assert batch_tokens({"rollout": rollout, "advantages": torch.zeros(2)}) == 8  # PPO's shape
    assert batch_tokens({"scores": torch.zeros(3)}) == 0


def test_gpu_check_stops_cleanly_without_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    start = time.time()
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert time.time() - start < 5
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no CUDA GPU" in run.stdout and "nothing to measure" in run.stdout


if __name__ == "__main__":
    _worker(sys.argv[1])
