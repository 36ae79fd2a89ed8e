"""alignkit run: recipes resolve (or fail in one line naming the recipe and stage/key), a recipe killed mid-stage
(SIGKILL) resumes to the same weights as an uninterrupted run, an unchanged re-run skips everything, an override
re-runs that stage and its dependents only. The real path: the bundled quickstart recipe on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.data import load_records
from alignkit.pipeline import RECIPES, load_recipe, run_recipe
from alignkit.pipeline.quickstart import paired_rise, quickstart
from alignkit.pipeline.recipe import load


def tiny_overrides(model_dir) -> list[str]:
    """The quickstart recipe shrunk to seconds: a tiny model, a length reward (distinct scores, so pairs exist)."""
    return [f"model={model_dir}", "reward=length:6", "max_new_tokens=10", "sample.max_prompts=16",
            "sample.prompts_per_step=16", "dpo.max_steps=24", "dpo.save_steps=2", "dpo.batch_size=2", "dpo.lr=1e-3",
            "dpo.lora_r=4", "dpo.mixed_precision=no", "dpo.progress=false", "eval_base.max_prompts=6",
            "eval_dpo.max_prompts=6"]


def _statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "dpo" / "final" / "adapter_model.safetensors")


def test_kill_resume_skip_and_override(tiny_model_dir, tmp_path):
    overrides = tiny_overrides(tiny_model_dir)
    a, b = tmp_path / "a", tmp_path / "b"

    # uninterrupted
    assert set(_statuses(run_recipe("bundled:quickstart", overrides, str(a), echo=False)).values()) == {"ran"}
    resolved = (a / "recipe.resolved.yaml").read_text()
    assert f"data: {a / 'sample' / 'pairs.jsonl'}" in resolved and "hash:" in resolved
    assert "pairs" in (a / "sample" / "log.txt").read_text() and (a / "report" / "report.html").exists()

    # unchanged: everything skipped, nothing rewritten
    stamp = (a / "dpo" / "final" / "adapter_model.safetensors").stat().st_mtime_ns
    assert set(_statuses(run_recipe("bundled:quickstart", overrides, str(a), echo=False)).values()) == {"skipped"}
    assert (a / "dpo" / "final" / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    # killed mid-DPO with SIGKILL, then re-run: sampling skipped, DPO resumed from its checkpoint
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "run", "bundled:quickstart", *overrides,
                             "--run-dir", str(b)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: a loaded shared machine
    while not (b / "dpo" / "checkpoint-6").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "dpo" / "final").exists() and not (b / "dpo" / ".done").exists(), "the kill came too late"
    assert (b / "sample" / ".done").exists()
    statuses = _statuses(run_recipe("bundled:quickstart", overrides, str(b), echo=False))
    assert statuses == {"sample": "skipped", "dpo": "resumed", "eval_base": "ran", "eval_dpo": "ran", "report": "ran"}
    final_a, final_b = _adapter(a), _adapter(b)
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    steps = [json.loads(line)["step"] for line in (b / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 0] == list(range(1, 25))  # no step lost or logged twice
    eval_a, eval_b = (json.loads((run / "eval_dpo" / "eval.json").read_text()) for run in (a, b))
    assert eval_a.pop("model") == str(a / "dpo") and eval_b.pop("model") == str(b / "dpo") and eval_a == eval_b

    # an override re-runs its stage and what reads it; the rest is skipped
    statuses = _statuses(run_recipe("bundled:quickstart", [*overrides, "dpo.beta=0.3"], str(a), echo=False))
    assert statuses == {"sample": "skipped", "dpo": "ran", "eval_base": "skipped", "eval_dpo": "ran", "report": "ran"}
    assert not torch.equal(next(iter(_adapter(a).values())), next(iter(final_a.values())))


def test_quickstart_summary_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    summary = quickstart(str(tmp_path / "qs"), tiny_overrides(tiny_model_dir), echo=False)
    before = [json.loads(x) for x in (tmp_path / "qs" / "eval_base" / "eval.samples.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (tmp_path / "qs" / "eval_dpo" / "eval.samples.jsonl").read_text().splitlines()]
    assert len(before) == len(after) == 6 * 4
    assert summary["reward_after"] - summary["reward_before"] == pytest.approx(summary["rise"], abs=1e-6)
    assert isinstance(summary["kl"], float)  # a Monte Carlo estimate: may dip below 0 on a near-untrained tiny model
    assert "held-out VADER reward" in capsys.readouterr().out


def test_paired_rise_by_hand():
    """Two prompts, two samples each: before means 0.0 and 0.5, after 1.0 and 0.5 -> Δ = (1.0, 0.0), mean 0.5,
    sd = √0.5, SE = √0.5 / √2 = 0.5."""
    before = [{"prompt": "a", "reward": 0.0}, {"prompt": "a", "reward": 0.0},
              {"prompt": "b", "reward": 0.0}, {"prompt": "b", "reward": 1.0}]
    after = [{"prompt": "a", "reward": 1.0}, {"prompt": "a", "reward": 1.0},
             {"prompt": "b", "reward": 0.5}, {"prompt": "b", "reward": 0.5}]
    assert paired_rise(before, after) == pytest.approx((0.5, 0.5, 2))


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_bundled_recipes_resolve(recipe, tmp_path):
    loaded = load_recipe(RECIPES / recipe, run_dir=str(tmp_path))
    assert loaded.stages and all(s.dir.parent == tmp_path for s in loaded.stages)
    for stage in loaded.stages:
        for value in stage.resolved.values():
            assert "${" not in str(value)


def _readers(tokenizer):
    """How each command reads its ``data``/``eval_data`` (the function it calls on the file)."""
    from alignkit.data import read_examples, sft_example
    from alignkit.feedback.critique import read_items
    from alignkit.online import read_prompts

    prompts = lambda source: read_prompts(source, tokenizer, 1024)  # noqa: E731
    return {**{c: prompts for c in ("bon", "evaluate", "ppo", "grpo", "rloo", "raft")},
            "sft": lambda source: read_examples(source, sft_example, tokenizer, 1024),
            "critique": read_items,
            "curate": lambda source: load_records(source)}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_bundled_recipes_read_their_bundled_data(recipe, tmp_path, tiny_model_dir):
    """Every bundled data set a bundled recipe names reads with its stage's reader: a shape mismatch shows here,
    not hours into ``alignkit run``."""
    from alignkit.models import load_tokenizer

    readers = _readers(load_tokenizer(str(tiny_model_dir)))
    named = [(stage, value) for stage in load_recipe(RECIPES / recipe, run_dir=str(tmp_path)).stages
             for key, value in stage.resolved.items() if key in ("data", "eval_data") and str(value).startswith("bundled:")]
    for stage, source in named:
        assert stage.command in readers, f"{recipe}: stage {stage.name}: no reader known for {stage.command}"
        assert len(readers[stage.command](source)) > 0, f"{recipe}: stage {stage.name} read nothing from {source}"


BASE = """model: m
stages:
  sample:
    command: bon
    data: prompts.jsonl
  dpo:
    data: ${stages.sample.pairs}
"""


@pytest.mark.parametrize("body, overrides, expected", [
    (BASE + "    lrr: 1\n", [], "stages.dpo: unknown option 'lrr' for command 'dpo'"),
    (BASE + "    eval_data: ${stages.sampel.pairs}\n", [], "stages.dpo.eval_data: ${stages.sampel.pairs}: no earlier stage 'sampel'"),
    (BASE + "    eval_data: ${stages.sample.model}\n", [], "stages.dpo.eval_data: ${stages.sample.model}: stage 'sample' (bon) has no output 'model'"),
    (BASE + "    eval_data: ${stages.dpo.dir}\n", [], "no earlier stage 'dpo'"),
    (BASE + "    eval_data: ${foo}\n", [], "stages.dpo.eval_data: unknown reference ${foo}"),
    (BASE + "    lr: fast\n", [], "stages.dpo.lr: expected float, got 'fast'"),
    (BASE + "    output_dir: x\n", [], "stages.dpo.output_dir: set by the pipeline"),
    (BASE + "  judge:\n    x: 1\n", [], "stages.judge: unknown command 'judge'"),
    (BASE, ["dpo.lr"], "override 'dpo.lr': expected stage.key=value"),
    (BASE, ["sft.lr=1"], "override 'sft.lr=1': no stage 'sft'"),
    (BASE, ["dpo.beta=big"], "stages.dpo.beta: expected float, got 'big'"),
    (BASE, ["dpo.betta=0.2"], "stages.dpo: unknown option 'betta'"),
    (BASE, ["colour=red"], "top-level option 'colour' is an option of no stage's command"),
    ("stages: []\n", [], "expected a mapping with a non-empty 'stages:'"),
    ("stages: {a: [\n", [], "invalid YAML"),
])
def test_recipe_errors_name_file_and_key(tmp_path, body, overrides, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as error:
        load(path, overrides, run_dir=str(tmp_path / "run"))
    assert expected in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_cli_error_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    assert main(["run", str(path), "dpo.lr=slow", "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"alignkit: error: {path}: stages.dpo.lr: expected float, got 'slow'"
    assert not (tmp_path / "run").exists()


def test_values_coerced_and_sections_accepted(tmp_path):
    """YAML 1.1 reads 2e-4 as a string and 1 as an int: both become the float the option declares; options may sit
    under model:/data:/train: sections; overrides reach sectioned keys too."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nstages:\n  dpo:\n    data: p.jsonl\n    train: {lr: 2e-4, epochs: 1}\n")
    stage = load(path, ["dpo.train.batch_size=4"], run_dir=str(tmp_path / "r")).stages[0]
    assert stage.resolved == {"data": "p.jsonl", "lr": 2e-4, "epochs": 1.0, "batch_size": 4, "model": "m"}


def test_hash_follows_input_content_and_upstream_only(tmp_path):
    """Editing a data file changes the hash of the stage that reads it and of its dependents, not of the others;
    the same values written differently (2e-4 vs 0.0002, an override) hash alike."""
    from alignkit.pipeline.runner import hashes_of

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: m\nstages:\n  sample:\n    command: bon\n    data: {prompts}\n  dpo:\n"
                    "    data: ${stages.sample.pairs}\n    lr: 2e-4\n  other:\n    command: evaluate\n    data: x.jsonl\n")
    before = hashes_of(load(path, run_dir=str(tmp_path / "r")))
    assert before == hashes_of(load(path, ["dpo.lr=0.0002"], run_dir=str(tmp_path / "elsewhere")))
    prompts.write_text('{"prompt": "b"}\n')
    after = hashes_of(load(path, run_dir=str(tmp_path / "r")))
    assert after["sample"] != before["sample"] and after["dpo"] != before["dpo"] and after["other"] == before["other"]


def test_option_values_validated_before_anything_runs(tiny_model_dir, tmp_path):
    """Values are checked (alignkit.config.validate) for every stage before the first one starts (a stage reading an
    earlier stage's output not written yet is checked again when it starts)."""
    with pytest.raises(ValueError) as error:
        load_recipe("bundled:quickstart", [f"model={tiny_model_dir}", "eval_base.max_prompts=-1"],
                    run_dir=str(tmp_path / "r"))
    assert str(error.value).startswith(f"{RECIPES / 'quickstart.yaml'}: stages.eval_base.max_prompts -1: ")
    assert not (tmp_path / "r").exists()
