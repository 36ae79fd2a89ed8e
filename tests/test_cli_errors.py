"""Every error a user can cause with flags, YAML or data ends the same way (issue #8, item 8): one line on
stderr naming the flag, YAML key or file (and line), exit status 1, and nothing written — no output directory.
Options are checked before a model is loaded; data errors come from reading the files after it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from alignkit import cli
from alignkit.config import OptionError, validate
from alignkit.data import DataError, load_records, read_examples, sft_example
from alignkit.data.records import text_file_problem
from alignkit.models import load_tokenizer
from alignkit.rewards import load_reward

SFT_ROWS = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(4)]


def run_cli(capsys, argv: list[str]) -> str:
    """cli.main's stderr, asserted to be exactly one line after exit status 1."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: "), err
    return lines[0].removeprefix("alignkit: error: ")


@pytest.fixture
def data(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS))


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "run"


def sft(model, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model), "--data", data, "--output-dir", str(out), "--report-to", "none",
            "--no-progress", *extra]


# ------------------------------------------------------------------------------------------------ options

OPTION_CASES = [  # (extra sft flags, the message after "alignkit: error: ")
    (["--batch-size", "0"], "--batch-size 0: expected a value >= 1"),
    (["--grad-accum", "-2"], "--grad-accum -2: expected a value >= 1"),
    (["--lr", "-0.001"], "--lr -0.001: expected a value > 0"),
    (["--lr", "nan"], "--lr nan: expected a value > 0"),
    (["--schedule", "foo"], "--schedule 'foo': expected one of cosine, linear, constant"),
    (["--mixed-precision", "foo"], "--mixed-precision 'foo': expected one of auto, bf16, no"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: expected a value in [0, 1]"),
    (["--max-length", "0"], "--max-length 0: expected a value >= 1"),
    (["--report-to", "tensorbored"], "--report-to 'tensorbored': expected a comma-separated list of tensorboard, wandb, "
                                     "mlflow or none"),
    (["--lora", "--lora-r", "0"], "--lora-r 0: expected a value >= 1"),
    (["--epochs", "0"], "--epochs 0.0: expected a value > 0"),
]


@pytest.mark.parametrize(("extra", "message"), OPTION_CASES, ids=[c[0][-2] for c in OPTION_CASES])
def test_bad_option_is_one_line_and_writes_nothing(capsys, tiny_model_dir, data, out, extra, message):
    assert run_cli(capsys, sft(tiny_model_dir, data, out, *extra)) == message
    assert not out.exists()


def test_algorithm_options(capsys, tiny_model_dir, data, out):
    base = ["--model", str(tiny_model_dir), "--data", data, "--output-dir", str(out)]
    cases = [
        (["dpo", "--loss", "foo"], "--loss 'foo': expected one of sigmoid, ipo, hinge, robust, simpo, orpo"),
        (["dpo", "--beta", "-1"], "--beta -1.0: expected a value >= 0"),
        (["dpo", "--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing 0.1: must be 0 with --loss ipo "
                                                                "(not defined for it)"),
        (["dpo", "--no-precompute-ref"], "--precompute-ref False: --no-precompute-ref with full fine-tuning needs "
                                         "--reference MODEL (no second copy is made)"),
        (["kto", "--beta", "0"], "--beta 0.0: expected a value > 0"),
        (["grpo", "--advantage", "ppo"], "--advantage 'ppo': expected one of grpo, rloo, reinforce++"),
        (["grpo", "--loss-agg", "mean"], "--loss-agg 'mean': expected one of token-mean, seq-mean, seq-sum"),
        (["grpo", "--group-size", "1"], "--group-size 1: --advantage grpo compares the responses to one prompt: "
                                        "expected at least 2"),
        (["ppo", "--max-steps", "-1"], "--max-steps -1: PPO needs --max-steps > 0 (rollout steps)"),
        (["ppo", "--temperature", "0"], "--temperature 0.0: expected a value > 0"),
        (["ppo", "--ptx-coef", "0.5"], "--ptx-coef 0.5: needs --ptx-data (SFT records)"),
        (["raft", "--stages", "0"], "--stages 0: expected a value >= 1"),
        (["bon", "--max-new-tokens", "0"], "--max-new-tokens 0: expected a value >= 1"),
        (["evaluate", "--top-p", "0"], "--top-p 0.0: expected a value in (0, 1]"),
        (["rm", "--center-rewards-coefficient", "-1"], "--center-rewards-coefficient -1.0: expected a value >= 0"),
        (["rrhf", "--rank-weight", "-1"], "--rank-weight -1.0: expected a value >= 0"),
    ]
    for argv, message in cases:
        flags = base if argv[0] != "evaluate" else [*base[:4], "--output", str(out / "metrics.json")]
        assert run_cli(capsys, argv + flags) == message, argv
        assert not out.exists()


def test_minibatch_split_is_checked_at_start(capsys, tiny_model_dir, data, out):
    argv = ["grpo", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(out),
            "--prompts-per-step", "3", "--group-size", "2", "--batch-size", "4", "--grad-accum", "1"]
    assert run_cli(capsys, argv) == ("--batch-size 4: 6 rows per process per step (prompts_per_step x group_size / "
                                     "processes) do not split into minibatches of batch_size x grad_accum = 4")
    assert not out.exists()


def test_missing_training_data(capsys, tiny_model_dir, out, tmp_path):
    argv = ["sft", "--model", str(tiny_model_dir), "--output-dir", str(out)]
    assert run_cli(capsys, argv) == ("--data '': expected training data: a .jsonl/.json/.parquet/.csv file, a saved "
                                     "datasets directory or bundled:NAME")
    assert run_cli(capsys, argv + ["--data", str(tmp_path / "nope.jsonl")]) == \
        f"--data '{tmp_path / 'nope.jsonl'}': no such file or directory"
    assert run_cli(capsys, argv + ["--data", "bundled:nope"]).startswith("--data 'bundled:nope': unknown bundled dataset")
    assert not out.exists()


def test_yaml_values_are_named_by_file_and_key(capsys, tiny_model_dir, data, out, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\noutput_dir: {out}\ntrain:\n  batch_size: 0\n")
    assert run_cli(capsys, ["sft", "--config", str(config)]) == f"{config}: batch_size 0: expected a value >= 1"
    # a flag overriding the YAML value is named as the flag
    assert run_cli(capsys, ["sft", "--config", str(config), "--batch-size", "-1"]) == "--batch-size -1: expected a value >= 1"
    assert not out.exists()


# -------------------------------------------------------------------------------------------------- models


def test_model_paths(capsys, data, out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    no_such = "no such directory (expected a bundled model (smollm2-135m), a local directory or a hub id org/name)"
    cases = {
        "./missing": no_such,
        str(tmp_path / "missing"): no_such,
        "~/surely/not/here": no_such,
        "runs/sft": no_such,  # ./runs exists: a path, not the hub id "runs/sft"
        "a/b/c": no_such,
        "empty": "not a model directory (no config.json, adapter_config.json, final/ or checkpoint-N/ in it)",
        "weights.bin": "expected a model directory, this is a file",
    }
    for model, message in cases.items():
        assert run_cli(capsys, sft(model, data, out)) == f"--model {model!r}: {message}"
    assert run_cli(capsys, ["dpo", "--data", data, "--output-dir", str(out), "--reference", "./nope"]) == \
        f"--reference './nope': {no_such}"
    assert run_cli(capsys, ["generate", "--model", "./missing", "--prompt", "hi"]) == f"--model './missing': {no_such}"
    assert not out.exists()


def test_hub_id_offline_is_one_line(tiny_model_dir, tmp_path):
    """A hub id is allowed through the start-up check; when the hub cannot provide it (offline here), the
    loader's error still ends as one line, exit status 1 — through the real entry point."""
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", "--model", "no-such-org/no-such-model",
                           "--data", str(data), "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: ") and "no-such-org/no-such-model" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------------- rewards

REWARD_CASES = {
    "nonsense::": "unknown reward; expected vader, length:N, regex:PATTERN, exact, http(s)://..., PATH, module:function",
    "length:many": "length:N needs an integer N (the target number of words)",
    "regex:(": "invalid regular expression (missing ), unterminated subpattern at position 0)",
    "http://": "expected http(s)://host[:port]/path",
    "no_such_module_xyz:score": "cannot import module 'no_such_module_xyz' (No module named 'no_such_module_xyz')",
    "alignkit.rewards:no_such_function": "module 'alignkit.rewards' has no attribute 'no_such_function'",
    "./no/such/rm": "no such reward-model directory",
}


@pytest.mark.parametrize(("spec", "message"), REWARD_CASES.items(), ids=list(REWARD_CASES))
def test_bad_reward_spec(capsys, tiny_model_dir, data, out, spec, message):
    argv = ["bon", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(out), "--reward", spec]
    assert run_cli(capsys, argv) == f"--reward {spec!r}: {message}"
    assert not out.exists()
    with pytest.raises(ValueError) as e:  # the library call says the same, in one line
        load_reward(spec)
    assert str(e.value) == f"reward {spec!r}: {message}"


def test_good_specs_pass_validation(tiny_model_dir, data):
    from alignkit.algos.grpo import GRPOConfig
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.online import RolloutConfig

    for spec in ("vader", "exact", "length:5", "regex:^yes", "http://127.0.0.1:9/score", "alignkit.rewards:vader_sentiment",
                 str(tiny_model_dir)):
        validate(GRPOConfig(model=ModelConfig(model=str(tiny_model_dir)), data=DataConfig(data=data),
                            rollout=RolloutConfig(reward=spec, prompts_per_step=16, group_size=4)))
    with pytest.raises(OptionError):
        validate(GRPOConfig(rollout=RolloutConfig(reward="regex:(")))


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: expected a value >= 1"),
    (["--batch-size", "0"], "--batch-size 0: expected a value >= 1"),
    (["--temperature", "-1"], "--temperature -1.0: expected a value >= 0"),
    (["--top-p", "1.5"], "--top-p 1.5: expected a value in [0, 1]"),
])
def test_generate_flags(capsys, tiny_model_dir, flags, message):
    assert run_cli(capsys, ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", *flags]) == message


def test_generate_prompts_file_without_prompt(capsys, tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"text": "no prompt"}])
    assert run_cli(capsys, ["generate", "--model", str(tiny_model_dir), "--prompts-file", str(path)]) == \
        f"{path}:2: field 'prompt': expected a non-empty string or list of messages"


# ------------------------------------------------------------------------------------------------- data files


def test_non_utf8_data_file(capsys, tiny_model_dir, out, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "Q?", "completion": "A."}\n{"prompt": "caf\xe9?", "completion": "A."}\n')
    problem = "line 2: not UTF-8 text (byte 52 is 0xe9: invalid continuation byte); save the file as UTF-8"
    assert run_cli(capsys, sft(tiny_model_dir, str(path), out)) == f"--data '{path}': {problem}"
    assert not out.exists()
    # the library reads through the same decoder: file:line
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 52 is 0xe9: invalid continuation byte); save the file as UTF-8"
    for suffix, text in ((".json", b'[{"prompt": "x"},\n {"prompt": "caf\xe9"}]'), (".csv", b"prompt,completion\ncaf\xe9,x\n")):
        other = tmp_path / f"latin1{suffix}"
        other.write_bytes(text)
        assert run_cli(capsys, sft(tiny_model_dir, str(other), out)).startswith(f"--data '{other}': line 2: not UTF-8")
        with pytest.raises(DataError, match=f"^{other}:2: not UTF-8 text"):
            load_records(other)
    # the start-up check streams the file: a character split across two chunks is fine, a bad byte is found
    text = "é\n" * 40
    path.write_bytes(text.encode() + b"\xff")
    assert text_file_problem(path, chunk_size=7) == \
        "line 41: not UTF-8 text (byte 120 is 0xff: invalid start byte); save the file as UTF-8"
    path.write_bytes(text.encode())
    assert text_file_problem(path, chunk_size=7) is None
    # a byte-order mark (Windows editors) is not an error
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "Q?", "completion": "A."}\n')
    assert text_file_problem(bom) is None and load_records(bom)[0].data == {"prompt": "Q?", "completion": "A."}


def test_empty_data_file(capsys, tiny_model_dir, out, tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.csv", "")):
        path = tmp_path / name
        path.write_text(text)
        assert run_cli(capsys, sft(tiny_model_dir, str(path), out)) == f"--data '{path}': the file is empty"
        assert not out.exists()
    # files with text but no records are found once read: named all the same
    tok = load_tokenizer(str(tiny_model_dir))
    for name, text in (("empty.json", "[]"), ("header.csv", "prompt,completion\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError) as e:
            read_examples(str(path), sft_example, tok, None)
        assert str(e.value) == f"{path}: no valid examples (no records)"


def test_top_level_help_lists_every_command_without_loading_torch():
    """`alignkit --help` builds only the command list: no algorithm module (and so no torch) is imported. A
    command's own --help still shows its flags, and an unknown command is one argparse error naming the choices."""
    script = ("import sys\nfrom alignkit import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    print('exit', e.code, 'torch', 'torch' in sys.modules)\n")
    top = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=120)
    assert top.stdout.strip().endswith("exit 0 torch False"), top.stdout + top.stderr
    for name in [*cli.ALGORITHMS, "generate", *cli.TOOLS]:
        assert f"    {name} " in top.stdout or f"    {name}\n" in top.stdout, name
    dpo = subprocess.run([sys.executable, "-c", script, "dpo", "--help"], capture_output=True, text=True, timeout=120)
    assert "--precompute-ref" in dpo.stdout and dpo.stdout.strip().endswith("exit 0 torch True")
    wrong = subprocess.run([sys.executable, "-c", script, "dop"], capture_output=True, text=True, timeout=120)
    assert "invalid choice: 'dop'" in wrong.stderr and wrong.stdout.strip() == "exit 2 torch False"
