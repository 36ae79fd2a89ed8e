"""Small defects, each with a test that failed before its fix: YAML 1.1 exponents as numbers, best-of-N's progress
display, LoRA adapters seeded by the run's seed, metrics.jsonl trimmed on --resume, and the Python API validating
its config as the CLI does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from alignkit import cli
from alignkit.algos import bon, sft
from alignkit.config import DataConfig, ModelConfig, OptionError
from alignkit.engine import TrainConfig
from alignkit.online import RolloutConfig

ROWS = [{"prompt": f"Say {w}:", "completion": f" {w} {w}."} for w in ("yes", "no", "maybe", "never", "soon", "later")]


def _sft_config(model_dir, data: str, out: Path, **train) -> sft.SFTConfig:
    options = dict(output_dir=str(out), max_steps=2, batch_size=2, lr=1e-2, report_to="none", progress=False)
    return sft.SFTConfig(model=ModelConfig(model=str(model_dir), lora=True, lora_r=4, lora_alpha=8),
                         data=DataConfig(data=data, max_length=64), train=TrainConfig(**{**options, **train}))


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path, capsys):
    """PyYAML follows YAML 1.1, where `2e-4` (no dot) is the string '2e-4'."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 2e-4\ntrain:\n  weight_decay: 1E-2\n  max_grad_norm: 1\n")
    values = cli._load_yaml(str(config))
    assert values["lr"] == "2e-4"  # what the YAML reader gives
    cfg = cli.build_config(sft.SFTConfig, {}, values, source=str(config))
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.01 and cfg.train.max_grad_norm == 1.0
    config.write_text("lr: fast\n")
    with pytest.raises(SystemExit, match=r"run.yaml: lr: expected float, got 'fast'"):
        cli.build_config(sft.SFTConfig, {}, cli._load_yaml(str(config)), source=str(config))
    config.write_text("lr: nan\n")  # a word, not a number literal: still refused
    with pytest.raises(SystemExit, match="expected float"):
        cli.build_config(sft.SFTConfig, {}, cli._load_yaml(str(config)), source=str(config))


def test_bon_shows_progress(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Review {i}:"} for i in range(5)])
    cfg = bon.BoNConfig(model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=str(prompts), max_length=32),
                        rollout=RolloutConfig(reward="length:4", prompts_per_step=2, group_size=2, max_new_tokens=4),
                        output_dir=str(tmp_path / "bon"))
    bon.run(cfg)
    err = capsys.readouterr().err
    assert "best-of-2" in err and "5/5" in err and "prompt" in err
    bon.run(bon.BoNConfig(**{**cfg.__dict__, "progress": False, "output_dir": str(tmp_path / "quiet")}))
    assert "best-of-2" not in capsys.readouterr().err


def test_lora_start_does_not_depend_on_earlier_rng_use(tiny_model_dir, tmp_path):
    """Two runs with the same seed end with the same adapter whatever used the global RNG before them."""
    data = str(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    finals = []
    for i, earlier in enumerate((1, 2)):
        torch.manual_seed(earlier)  # e.g. another run earlier in the same process
        torch.rand(100)
        path = sft.train(_sft_config(tiny_model_dir, data, tmp_path / f"run{i}", seed=7))
        finals.append(load_file(path / "adapter_model.safetensors"))
    assert finals[0].keys() == finals[1].keys() and finals[0]
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name
    # and the seed does decide it
    other = load_file(sft.train(_sft_config(tiny_model_dir, data, tmp_path / "run-seed8", seed=8))
                      / "adapter_model.safetensors")
    assert any(not torch.equal(finals[0][n], other[n]) for n in other)


def test_resume_trims_metrics_to_the_checkpoint(tiny_model_dir, tmp_path):
    """A finished 4-step run with checkpoint-2, resumed: steps 3-4 run again and are logged once each."""
    data = str(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    out = tmp_path / "run"
    sft.train(_sft_config(tiny_model_dir, data, out, max_steps=4, save_steps=2, log_steps=1))
    assert (out / "checkpoint-2").is_dir()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.')  # a line cut short by a kill
    sft.train(_sft_config(tiny_model_dir, data, out, max_steps=4, save_steps=2, log_steps=1, resume=True))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_python_api_validates_like_the_cli(tiny_model_dir, tmp_path):
    data = str(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    out = tmp_path / "run"
    with pytest.raises(OptionError, match=r"^--batch-size 0: expected a value >= 1$"):
        sft.train(_sft_config(tiny_model_dir, data, out, batch_size=0))
    with pytest.raises(OptionError, match=r"^--model .*: no such directory"):
        sft.train(_sft_config(tmp_path / "missing", data, out))
    with pytest.raises(OptionError, match=r"^--max-prompts -1"):
        bon.run(bon.BoNConfig(model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=data),
                              max_prompts=-1, output_dir=str(out)))
    assert not out.exists()  # nothing written
