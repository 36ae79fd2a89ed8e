"""evaluate --judge --baseline writes X.verdicts.jsonl, and alignkit report reads it back: with a function judge
whose answer is known (length-based, plus a position bias that the two orders must cancel) the win rate is known."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from alignkit.cli import main
from alignkit.config import DataConfig, ModelConfig, OptionError
from alignkit.data import DataError
from alignkit.evaluate import EvalConfig, run, samples_path, verdicts_path
from alignkit.models import tiny_causal_lm
from alignkit.online import RolloutConfig
from alignkit.report import ReportConfig, write_report
from alignkit.report.collect import collect
from alignkit.report.winrate import length_controlled

BIAS = 0.1  # the judge favours whatever it is shown first by this much


def length_judge(prompt, first, second) -> float:
    """P(first preferred): 0.5 ± 0.3 by which response has more characters, + BIAS for being first."""
    sign = (len(first) > len(second)) - (len(first) < len(second))
    return 0.5 + 0.3 * sign + BIAS


def expected_win(candidate: str, baseline: str) -> float:
    # both orders: (0.5 + 0.3 s + BIAS + 1 − (0.5 − 0.3 s + BIAS)) / 2 = 0.5 + 0.3 s: the bias cancels
    return 0.5 + 0.3 * ((len(candidate) > len(baseline)) - (len(candidate) < len(baseline)))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=64, seed=1)
    path = tmp_path_factory.mktemp("tiny-llama-seed1")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def prompts(tmp_path):
    return str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review {i}: the film was"} for i in range(4)]))


def _config(model, prompts, **kw) -> EvalConfig:
    return EvalConfig(model=ModelConfig(model=str(model)), data=DataConfig(data=prompts, max_length=32),
                      rollout=RolloutConfig(reward="length:6", group_size=2, max_new_tokens=10), **kw)


def test_verdicts_round_trip_to_the_report(tiny_model_dir, other_model_dir, prompts, tmp_path):
    base_out = tmp_path / "runs" / "base" / "eval.json"
    run(_config(tiny_model_dir, prompts, output=str(base_out)))
    out = tmp_path / "runs" / "tuned" / "eval.json"
    metrics = run(_config(other_model_dir, prompts, output=str(out), judge="test_evaluate_judge:length_judge",
                          baseline=str(samples_path(base_out))))

    candidates = [json.loads(line) for line in samples_path(out).read_text().splitlines()]
    baselines = [json.loads(line) for line in samples_path(base_out).read_text().splitlines()]
    verdicts = [json.loads(line) for line in verdicts_path(out).read_text().splitlines()]
    assert len(verdicts) == len(candidates) == 8
    for v, c, b in zip(verdicts, candidates, baselines, strict=True):  # the k-th sample of a prompt vs the k-th
        assert v["prompt"] == c["prompt"] == b["prompt"]
        assert (v["candidate"], v["baseline"]) == (c["completion"], b["completion"])
        assert v["win"] == pytest.approx(expected_win(c["completion"], b["completion"]))
        assert v["p_candidate_first"] == pytest.approx(v["win"] + BIAS)
    wins = [expected_win(c["completion"], b["completion"]) for c, b in zip(candidates, baselines, strict=True)]
    assert len(set(wins)) > 1  # the two models' samples differ in length both ways: a real test of the sign
    raw = sum(wins) / len(wins)
    assert metrics["judge/win_rate"] == pytest.approx(raw)
    assert json.loads(out.read_text())["judge/win_rate"] == pytest.approx(raw)

    # the report reads the verdicts back: raw and length-controlled win rates
    found = collect([tmp_path / "runs"])
    assert [v.label for v in found.verdicts] == ["runs/tuned/eval.verdicts"]
    html = write_report(ReportConfig(runs=str(tmp_path / "runs"), output=str(tmp_path / "report.html"))).read_text()
    assert "Judge win rates" in html and "runs/tuned/eval.verdicts" in html
    from alignkit.report.winrate import win_rate

    rate = win_rate("x", found.verdicts[0].records)
    assert rate.raw == pytest.approx(raw) and rate.n == 8
    diffs = [len(c["completion"].split()) - len(b["completion"].split()) for c, b in zip(candidates, baselines)]
    lc, _ = length_controlled(wins, diffs)
    assert rate.length_controlled == pytest.approx(lc)
    assert f"{rate.raw:.3f}"[:4] in html or f"{100 * rate.raw:.1f}" in html


def test_baseline_base_samples_the_reference_in_the_same_run(tiny_model_dir, other_model_dir, prompts, tmp_path):
    """--baseline base with --reference R compares with R's samples drawn with the same seed: the same verdicts as
    against R's own earlier evaluate."""
    earlier = tmp_path / "ref.json"
    run(_config(tiny_model_dir, prompts, output=str(earlier)))
    judge = "test_evaluate_judge:length_judge"
    from_file = tmp_path / "a.json"
    run(_config(other_model_dir, prompts, output=str(from_file), judge=judge, baseline=str(samples_path(earlier))))
    in_run = tmp_path / "b.json"
    run(_config(other_model_dir, prompts, output=str(in_run), judge=judge, baseline="base",
                reference=str(tiny_model_dir)))
    assert verdicts_path(from_file).read_text() == verdicts_path(in_run).read_text()


def test_judge_options_are_checked(tiny_model_dir, prompts, tmp_path, capsys):
    with pytest.raises(OptionError, match="--judge needs --baseline too"):
        run(_config(tiny_model_dir, prompts, judge="test_evaluate_judge:length_judge", output=str(tmp_path / "x.json")))
    with pytest.raises(OptionError, match="--baseline .*no such file"):
        run(_config(tiny_model_dir, prompts, judge="local", baseline=str(tmp_path / "missing.jsonl")))
    with pytest.raises(OptionError, match="give --output"):
        run(_config(tiny_model_dir, prompts, judge="local", baseline="base"))
    with pytest.raises(OptionError, match="needs a reference"):
        run(_config(tiny_model_dir, prompts, judge="test_evaluate_judge:length_judge", baseline="base",
                    output=str(tmp_path / "y.json")))
    other = write_jsonl(tmp_path / "other.samples.jsonl", [{"prompt": "Something else", "completion": "x"}])
    with pytest.raises(DataError, match="has no response to the prompt 'Review 0: the film was'"):
        run(_config(tiny_model_dir, prompts, judge="test_evaluate_judge:length_judge", baseline=str(other),
                    output=str(tmp_path / "z.json")))
    broken = tmp_path / "broken.samples.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code = main(["evaluate", "--model", str(tiny_model_dir), "--data", prompts, "--reward", "length:6",
                 "--judge", "test_evaluate_judge:length_judge", "--baseline", str(broken), "--output",
                 str(tmp_path / "w.json")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit: error")]
    assert code == 1 and errors == [f"alignkit: error: {broken}:2: expected an evaluate sample {{prompt, completion "
                                    "(a string), ...}"]
    assert not (tmp_path / "w.json").exists() and not (tmp_path / "z.json").exists()
    code = main(["evaluate", "--model", str(tiny_model_dir), "--data", prompts, "--judge", "nonsense"])
    assert code == 1 and "--judge 'nonsense': expected local[:MODEL]" in capsys.readouterr().err
