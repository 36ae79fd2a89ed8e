"""SFT learns (held-out loss falls), on a tiny model and on the bundled SmolLM2 with LoRA; the CLI wires flags,
YAML and errors correctly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from alignkit.algos import sft
from alignkit.cli import build_config
from alignkit.config import DataConfig, ModelConfig
from alignkit.engine import TrainConfig


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _bundled_slice(tmp_path, n_train: int, n_test: int):
    from alignkit.data import load_records

    train = write_jsonl(tmp_path / "train.jsonl", [r.data for r in load_records("bundled:instructions_train")[:n_train]])
    held_out = write_jsonl(tmp_path / "test.jsonl", [r.data for r in load_records("bundled:instructions_test")[:n_test]])
    return str(train), str(held_out)


def test_sft_with_packing_lowers_held_out_loss_tiny_model(tiny_model_dir, tmp_path):
    train, held_out = _bundled_slice(tmp_path, 96, 16)
    cfg = sft.SFTConfig(
        model=ModelConfig(model=str(tiny_model_dir)),
        data=DataConfig(data=train, eval_data=held_out, max_length=256),
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, lr=1e-2, warmup_steps=2,
                          report_to="none", progress=False),
        packing=True,
    )
    sft.train(cfg)
    evals = [m["eval/loss"] for m in _metrics(tmp_path / "run") if "eval/loss" in m]
    assert len(evals) == 2
    # ln(49152) = 10.8 for a uniform model; learning the answer distribution must cut the held-out NLL a lot
    assert evals[0] > 10.0 and evals[1] < evals[0] - 2.0, evals


def test_lora_sft_on_bundled_smollm2_lowers_held_out_loss(tmp_path):
    """Integration: the real bundled model, LoRA, a few steps on a slice of the bundled instruction set."""
    train, held_out = _bundled_slice(tmp_path, 32, 16)
    cfg = sft.SFTConfig(
        model=ModelConfig(model="smollm2-135m", lora=True),
        data=DataConfig(data=train, eval_data=held_out, max_length=256),
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, lr=1e-3, report_to="none",
                          progress=False),
    )
    path = sft.train(cfg)
    before, after = [m["eval/loss"] for m in _metrics(tmp_path / "run") if "eval/loss" in m]
    assert after < before - 0.05, (before, after)
    assert (path / "adapter_model.safetensors").exists()


def test_build_config_yaml_then_flags():
    yaml_values = {"model": {"lora": True, "lora_r": 4}, "lr": 1e-3, "max_length": 256, "data": "x.jsonl", "packing": True}
    cfg = build_config(sft.SFTConfig, {"lr": 5e-4, "lora_r": 8}, yaml_values)
    assert cfg.model.lora and cfg.model.lora_r == 8  # flag beats YAML
    assert cfg.train.lr == 5e-4 and cfg.data.max_length == 256 and cfg.data.data == "x.jsonl" and cfg.packing
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched defaults stay
    with pytest.raises(SystemExit, match="unknown option 'lrr'"):
        build_config(sft.SFTConfig, {}, {"lrr": 1.0}, source="run.yaml")
    with pytest.raises(SystemExit, match="max_steps: expected int"):
        build_config(sft.SFTConfig, {}, {"max_steps": "ten"}, source="run.yaml")


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_data_fails_with_one_line_error_and_writes_nothing(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    with data.open("a") as f:
        f.write('{"prompt": "x", "completion": 3}\n')
    out = tmp_path / "run"
    result = _run_cli("sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"alignkit: error: {data}:2: field 'completion': expected a string or a list of messages, got int"
    )
    assert not out.exists()


def test_cli_yaml_config_trains_and_skip_invalid_reports(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)] + [{"prompt": "q"}])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\ntrain:\n  max_steps: 2\n  batch_size: 4\n"
                      "  mixed_precision: 'no'\n  report_to: none\n")
    out = tmp_path / "run"
    result = _run_cli("sft", "--config", str(config), "--output-dir", str(out), "--skip-invalid", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 invalid records (1 missing field 'completion')" in result.stderr
    assert (out / "final" / "model.safetensors").exists()
    saved = json.loads((out / "final" / "alignkit_config.json").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["mixed_precision"] == "no"


def test_generate_cli_samples_from_a_run_dir(tiny_model_dir):
    result = _run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "Hello", "--prompt", "Hi",
                      "--max-new-tokens", "5", "--temperature", "0", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"][0]["content"] for line in lines] == ["Hello", "Hi"]
    assert all(isinstance(line["completion"], str) for line in lines)
