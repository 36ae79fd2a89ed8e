"""AI feedback: judge math against a hand forward, debiasing of a planted position bias, the on-disk cache (a killed
job resumes with no repeated call; concurrent writers), ``alignkit label`` -> rm/dpo data round trip, the RLAIF
loop (label -> rm on soft labels -> grpo with that reward model) and ``alignkit critique`` on tiny models."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from alignkit.cli import main
from alignkit.data import DataError, load_records, preference_example, read_examples, sft_example
from alignkit.feedback import (
    EnsembleJudge,
    FunctionJudge,
    JudgeCache,
    LabelConfig,
    LocalLMJudge,
    RewardModelJudge,
    judge_report,
    label,
    load_constitution,
    load_judge,
)
from alignkit.feedback.judges import ENDING, answer_tokens, judge_request, render

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny():
    from alignkit.models import tiny_causal_lm

    return tiny_causal_lm(num_layers=2, hidden_size=64)


# ------------------------------------------------------------------------------------------- judge math


def test_answer_tokens_of_smollm2_need_a_space_before_the_digit(tiny):
    """SmolLM2 splits " 1" into " " + "1", so the prompt ends with "Preferred response: " and the answers are the
    single tokens "1" and "2"."""
    _, tokenizer = tiny
    assert tokenizer.encode(" 1", add_special_tokens=False) == [216, 33]
    sep, id_1, id_2 = answer_tokens(tokenizer)
    assert (sep, id_1, id_2) == (" ", 33, 34)


def test_local_judge_equals_a_hand_forward_in_both_orders(tiny):
    """p = exp(ℓ1) / (exp(ℓ1) + exp(ℓ2)) from one unpadded forward per shown order, ℓ the log-softmax of the last
    position; p_ba = 1 − P(first | B first); p_a their mean. The judge batches rows of different lengths (left
    padding, position ids from each row's first token), so this also checks the padded forward."""
    model, tokenizer = tiny
    judge = LocalLMJudge(model, tokenizer, batch_size=8)
    prompts = ["Say hi.", "Name a colour, please, in one word.", "2+2?"]
    a = ["Hi!", "Blue.", "4, because two and two make four."]
    b = ["Hello there, nice to meet you.", "I like green very much.", "5"]
    verdicts = judge.compare(prompts, a, b)

    def by_hand(prompt: str, first: str, second: str) -> float:
        text = render(tokenizer, judge_request(prompt, first, second, judge.principle), ENDING + " ")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        l1, l2 = logp[33].item(), logp[34].item()
        return math.exp(l1) / (math.exp(l1) + math.exp(l2))

    for v, p, x, y in zip(verdicts, prompts, a, b, strict=True):
        assert v.p_ab == pytest.approx(by_hand(p, x, y), abs=2e-5)
        assert v.p_ba == pytest.approx(1 - by_hand(p, y, x), abs=2e-5)
        assert v.p_a == pytest.approx((v.p_ab + v.p_ba) / 2, abs=1e-12)
        assert v.consistent == ((v.p_ab > 0.5) == (v.p_ba > 0.5))
        assert v.judge.startswith("local:") and v.principle == judge.principle
    assert judge.calls == 6


def test_chain_of_thought_scores_after_the_generated_rationale(tiny_model_dir, tmp_path):
    """``alignkit label --judge local:DIR --cot``: the rationale is generated greedily from the CoT request, then
    the answer tokens are scored after "<rationale>\nPreferred response: " (checked by a hand forward)."""
    from alignkit.models import load_model

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}])
    out = tmp_path / "cot"
    assert main(["label", "--data", str(data), "--judge", f"local:{tiny_model_dir}", "--cot", "--cot-tokens", "5",
                 "--output-dir", str(out)]) == 0
    row = json.loads((out / "pairs.jsonl").read_text())
    rationales = row["judge"]["rationales"]
    assert len(rationales) == 2 and all(isinstance(r, str) for r in rationales)
    model, tokenizer = load_model(str(tiny_model_dir))

    def by_hand(first: str, second: str, rationale: str) -> float:
        request = judge_request("Say hi.", first, second, LabelConfig().principle, cot=True)
        ids = tokenizer(render(tokenizer, request, f"{rationale}\n{ENDING} "), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        return torch.sigmoid(logits[33] - logits[34]).item()

    chosen, rejected = row["chosen"], row["rejected"]
    assert row["judge"]["p_chosen_first"] == pytest.approx(by_hand(chosen, rejected, rationales[0]), abs=2e-5)
    assert row["judge"]["p_chosen_second"] == pytest.approx(1 - by_hand(rejected, chosen, rationales[1]), abs=2e-5)


def true_preference(first: str, second: str) -> float:
    """The unbiased judge of the debiasing tests: prefers the response with more words, P in [0.2, 0.8]."""
    return 0.5 + 0.3 * math.tanh(len(first.split()) - len(second.split()))


def test_averaging_both_orders_removes_an_additive_position_bias():
    """A judge that adds δ = 0.15 to P(first preferred): p_ab = p + δ, p_ba = 1 − (1 − p + δ) = p − δ, so the
    mean is exactly the unbiased p. Single-order labels are off by δ and pairs whose |p − ½| < δ flip with the
    order; the unbiased judge is position-consistent on every pair."""
    rng = random.Random(0)
    words = "a b c d e f".split()
    a = [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(40)]
    b = [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(40)]
    prompts = ["Q"] * 40
    biased = FunctionJudge(lambda p, x, y: true_preference(x, y) + 0.15)
    fair = FunctionJudge(lambda p, x, y: true_preference(x, y))
    vb, vf = biased.compare(prompts, a, b), fair.compare(prompts, a, b)
    for v, x, y in zip(vb, a, b, strict=True):
        assert v.p_a == pytest.approx(true_preference(x, y), abs=1e-12)
        assert v.p_ab == pytest.approx(true_preference(x, y) + 0.15, abs=1e-12)
    flipped = sum(0 < abs(true_preference(x, y) - 0.5) < 0.15 or true_preference(x, y) == 0.5 for x, y in zip(a, b))
    report_b, report_f = judge_report(vb, a, b), judge_report(vf, a, b)
    assert flipped > 0 and report_b["position_consistency"] == pytest.approx(1 - flipped / 40)
    assert report_f["position_consistency"] == 1.0
    assert report_b["first_position_wins"] > 0.5 and report_f["first_position_wins"] <= 0.5
    assert report_b["length_bias"]["longer_wins"] == 1.0  # this judge prefers longer answers, and the report sees it


def test_averaging_recovers_the_verdict_under_a_log_odds_position_bias():
    """A bias of b in log-odds: P(first) = σ(d + b). The average (σ(d+b) + σ(d−b))/2 is > ½ exactly when d > 0, so
    the debiased verdict always matches the unbiased one, while the single order says "first" for every |d| < b."""
    ds = [-2.0, -0.7, -0.3, 0.2, 0.6, 1.8]
    judge = FunctionJudge(lambda p, x, y: 1 / (1 + math.exp(-(float(x) - float(y) + 1.0))))
    verdicts = judge.compare(["Q"] * len(ds), [str(d) for d in ds], ["0"] * len(ds))
    for v, d in zip(verdicts, ds, strict=True):
        assert (v.p_a > 0.5) == (d > 0)
        assert v.consistent == (abs(d) > 1.0)
    assert all(v.p_ab > 0.5 for v, d in zip(verdicts, ds, strict=True) if abs(d) < 1)


def test_reward_model_judge_is_bradley_terry_and_ensemble_averages_principles():
    judge = RewardModelJudge("vader")
    v = judge.compare(["Review:"], ["A wonderful, lovely film."], ["A terrible, awful film."])[0]
    from alignkit.rewards.functions import vader_compound

    d = vader_compound("A wonderful, lovely film.") - vader_compound("A terrible, awful film.")
    assert v.p_a == pytest.approx(1 / (1 + math.exp(-d)), abs=1e-6) and v.consistent
    principled = FunctionJudge(lambda p, x, y, principle: 0.9 if principle == "first" else 0.3)
    ens = EnsembleJudge(principled, ["first", "other"]).compare(["Q"], ["x"], ["y"])[0]
    assert ens.p_ab == pytest.approx((0.9 + 0.3) / 2) and ens.p_ba == pytest.approx(1 - (0.9 + 0.3) / 2)
    assert len(load_constitution("default")) >= 8


def test_judge_specs_and_their_errors():
    assert isinstance(load_judge("reward:vader"), RewardModelJudge)
    assert isinstance(load_judge("test_feedback:true_preference"), FunctionJudge)
    with pytest.raises(DataError, match="--judge: unknown judge"):
        load_judge("nonsense")
    with pytest.raises(DataError, match="cannot import"):
        load_judge("test_feedback:no_such_function")
    with pytest.raises(DataError, match="--judge local:/no/such/model: cannot load the judge model"):
        load_judge("local:/no/such/model")


def test_http_answer_parsing_candidates_then_top_logprobs_then_text():
    """The three ways an OpenAI-compatible answer yields P(first): alignkit serve's candidate_logprobs, the
    top_logprobs of the first position (chat and completions shapes; a missing answer token bounded by the smallest
    listed log-prob), and the answer text as a last resort."""
    from alignkit.feedback.judges import HTTPJudge, pair_probability, parse_answer

    judge = HTTPJudge("http://127.0.0.1:9/v1", "m")
    assert judge._probability({"text": "2", "candidate_logprobs": {"1": -1.0, "2": -2.0}}) == \
        pytest.approx(1 / (1 + math.exp(-1.0)))
    chat = {"message": {"content": "1"}, "logprobs": {"content": [{"token": "1", "logprob": -0.5,
            "top_logprobs": [{"token": "1", "logprob": -0.5}, {"token": " 2", "logprob": -1.5},
                             {"token": "2", "logprob": -3.0}]}]}}
    expected = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.5) + math.exp(-3.0))  # " 2" and "2" both mean 2
    assert judge._probability(chat) == pytest.approx(expected)
    assert not judge.supports_candidates  # the server ignored candidate_tokens: not sent again
    completions = {"text": "1", "logprobs": {"top_logprobs": [{"1": -0.1, "The": -2.5}]}}
    assert judge._probability(completions) == pytest.approx(1 / (1 + math.exp(-2.4)))
    assert judge._probability({"text": "Response 2 is better."}) == 0.0
    assert pair_probability({"A": -1.0}) is None
    assert parse_answer("I prefer response 1.") == 1.0 and parse_answer("neither") == 0.5


# ------------------------------------------------------------------------------------------------- cache


def test_cache_answers_repeated_questions_and_keys_the_principle(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    judge = FunctionJudge(lambda p, x, y: true_preference(x, y), cache=cache)
    first = judge.compare(["Q", "Q"], ["a b", "a"], ["a", "a b c"])
    assert judge.calls == 4
    again = judge.compare(["Q", "Q"], ["a b", "a"], ["a", "a b c"])
    assert judge.calls == 4 and again == first
    judge.compare(["Q"], ["a b"], ["a"], principle="Which is shorter?")
    assert judge.calls == 6 and len(cache) == 6


COUNTING_JUDGE = '''
import json, os, time
def slow(prompt, first, second):
    time.sleep(0.03)
    with open(os.environ["JUDGE_LOG"], "a") as f:  # one line per call, written before the answer returns
        f.write(json.dumps([prompt, first, second]) + "\\n")
    return 0.5 + 0.4 * ((len(first) > len(second)) - (len(first) < len(second)))
'''


def _label_cmd(data: Path, out: Path, judge: str) -> list[str]:
    # the label command's entry point itself, without the CLI importing every trainer (faster start-up)
    code = ("import sys; from alignkit.config import DataConfig; from alignkit.feedback import LabelConfig, label; "
            "label(LabelConfig(data=DataConfig(data=sys.argv[1]), judge=sys.argv[2], output_dir=sys.argv[3], "
            "pairs='all'))")
    return [sys.executable, "-c", code, str(data), judge, str(out)]


def test_a_killed_label_job_resumes_without_asking_again(tmp_path):
    """SIGKILL a labelling subprocess mid-run, rerun it: every shown comparison is asked exactly once overall,
    except possibly the single call in flight at the kill (its answer was never stored). The killed run leaves
    no pairs.jsonl behind."""
    (tmp_path / "counting_judge.py").write_text(COUNTING_JUDGE)
    rows = [{"prompt": f"Prompt {i}", "responses": [f"r{i}", f"resp {i}", f"response {i}!"]} for i in range(12)]
    data = write_jsonl(tmp_path / "bon.jsonl", rows)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    env = {**os.environ, "JUDGE_LOG": str(log), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""), str(TESTS.parent)])}
    proc = subprocess.Popen(_label_cmd(data, out, "counting_judge:slow"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_run = log.read_text().splitlines()
    assert 20 <= len(first_run) < 72, "the job should have been killed mid-run"
    assert not (out / "pairs.jsonl").exists()
    stored = len(JudgeCache(out / "judge_cache.sqlite"))
    assert stored >= len(first_run) - 1

    done = subprocess.run(_label_cmd(data, out, "counting_judge:slow"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(set(calls)) == 12 * 3 * 2  # 3 pairs per prompt ("all"), two orders each
    assert len(calls) - len(set(calls)) <= 1
    repeated = {c for c in calls[len(first_run) :] if c in first_run}
    assert repeated <= {first_run[-1]}
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 36 and all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)


CACHE_WRITER = '''
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cache", sys.argv[1])
cache_mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(cache_mod)
cache = cache_mod.JudgeCache(sys.argv[2])
offset = int(sys.argv[3])
for i in range(0, 400, 4):  # 100 small transactions, overlapping the other writer's keys by half
    cache.put_many({f"k{offset + j}": ((offset + j) / 1000.0, "r" * 50) for j in range(i, i + 4)})
'''


def test_two_concurrent_writers_do_not_corrupt_the_cache(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(CACHE_WRITER)
    path = tmp_path / "shared.sqlite"
    cache_py = TESTS.parent / "alignkit" / "feedback" / "cache.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(cache_py), str(path), str(off)]) for off in (0, 200)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(db.execute("SELECT key, p_first FROM judgments").fetchall())
    assert len(rows) == 600 and all(rows[f"k{i}"] == pytest.approx(i / 1000.0) for i in range(600))


# ---------------------------------------------------------------------------------------------- label


def more_greats(prompt, first: str, second: str) -> float:
    """The labeller of the RLAIF test: prefers the response with more "great" words, with 90% confidence."""
    d = first.split().count("great") - second.split().count("great")
    return 0.5 if d == 0 else (0.9 if d > 0 else 0.1)


GREAT_WORDS = ["great", "bad", "movie", "the", "and", "film", "boring", "plot"]


def _bon_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        responses = []
        while len(responses) < 3:
            r = " " + " ".join(rng.choice(GREAT_WORDS) for _ in range(6))
            if r not in responses:
                responses.append(r)
        rows.append({"prompt": f"Review number {i}:", "responses": responses, "scores": [0.0, 0.0, 0.0]})
    return rows


def test_label_writes_soft_pairs_that_rm_and_dpo_read(tmp_path, tiny):
    data = write_jsonl(tmp_path / "bon.jsonl", _bon_rows(30, 0))
    out = tmp_path / "label"
    assert main(["label", "--data", str(data), "--judge", "test_feedback:more_greats", "--output-dir", str(out),
                 "--ground-truth", "regex:great", "--pairs", "adjacent"]) == 0
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 60 and len(pairs) == 60  # 2 adjacent pairs per prompt
    for p in pairs:
        assert 0.5 <= p["label"] <= 1.0
        gap = p["chosen"].split().count("great") - p["rejected"].split().count("great")
        assert p["label"] == pytest.approx(0.9 if gap > 0 else 0.5) and gap >= 0
        assert p["judge"]["consistent"] and p["judge"]["name"] == "function:test_feedback:more_greats"
    assert summary["position_consistency"] == 1.0 and summary["first_position_wins"] < 0.5  # ties: nobody wins
    gt = summary["ground_truth"]
    assert gt["agreement"] is not None and gt["pairs_with_a_winner"] <= 60

    # the data layers of rm and dpo read the file as it is, soft labels included
    from alignkit.algos.rm import rm_example

    _, tokenizer = tiny
    rm_examples = read_examples(str(out / "pairs.jsonl"), rm_example, tokenizer, 256)
    dpo_examples = read_examples(str(out / "pairs.jsonl"), preference_example, tokenizer, 256)
    assert [e.label for e in rm_examples] == [p["label"] for p in pairs] == [e.label for e in dpo_examples]


def by_principle(prompt, first: str, second: str, principle: str) -> float:
    """Prefers the longer response only under the constitution's 'clarity' principle (which asks for concision: a
    principle-sensitive labeller for the ensemble test), else is indifferent."""
    if "clearer" not in principle:
        return 0.5
    return 0.2 if len(first) > len(second) else 0.8


def test_label_ensemble_over_the_constitution_and_min_label(tmp_path):
    """--ensemble default averages over all principles of the bundled constitution: one of them moves P by ±0.3,
    so the label is 0.5 + 0.3/K; --min-label above that drops every pair."""
    k = len(load_constitution())
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "responses": ["short", "a much longer answer"]}])
    out = tmp_path / "ens"
    assert main(["label", "--data", str(data), "--judge", "test_feedback:by_principle", "--ensemble", "default",
                 "--output-dir", str(out)]) == 0
    row = json.loads((out / "pairs.jsonl").read_text())
    assert row["chosen"] == "short" and row["label"] == pytest.approx(0.5 + 0.3 / k)
    assert row["judge"]["name"].startswith("ensemble(") and json.loads((out / "summary.json").read_text())[
        "judge_calls"] == 2 * k
    assert main(["label", "--data", str(data), "--judge", "test_feedback:by_principle", "--ensemble", "default",
                 "--min-label", "0.6", "--output-dir", str(out)]) == 0
    assert (out / "pairs.jsonl").read_text() == ""
    assert json.loads((out / "summary.json").read_text())["dropped_below_min_label"] == 1


def test_label_errors_are_one_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "responses": ["a", "b"]}, {"prompt": "y", "responses": ["a"]}])
    assert main(["label", "--data", str(bad), "--judge", "reward:vader", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"alignkit: error: {bad}:2: field 'responses': expected a list of at least 2 responses"
    assert not (tmp_path / "o" / "pairs.jsonl").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}])
    assert main(["label", "--data", str(good), "--judge", "reward:vader", "--pairs", "some",
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "--pairs must be one of adjacent, all" in capsys.readouterr().err


def test_constitution_errors_name_file_and_field(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n  - name: x\n    principle: Which?\n    critique_request: Criticise.\n")
    with pytest.raises(DataError, match=r"c.yaml: principles\[0\].revision_request: expected a non-empty string"):
        load_constitution(str(path))
    assert main(["critique", "--data", "bundled:instructions_test", "--constitution", str(path),
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().endswith("principles[0].revision_request: expected a non-empty string, got None")


# ------------------------------------------------------------------------------ RLAIF loop end to end

from test_grpo import peaked_model_dir  # noqa: E402,F401  (the fixture: a tiny llama that samples 8 words)


def test_rlaif_loop_label_then_rm_on_soft_labels_then_grpo(tmp_path, tiny_model_dir, peaked_model_dir):  # noqa: F811
    """AI labels (a judge preferring more "great" words, 90% confident) -> a reward model trained on the soft labels
    -> GRPO on a tiny policy with that reward model. Known answer: the reward model ranks held-out responses by
    their number of "great" words, and GRPO raises both the reward-model score and the share of "great".
    fp32 and seed 0 throughout: a reward model from 80 pairs can be exploited, and some seeds' policies climb its
    score with other words (seed 1, 5 steps: no "great" left), so the trajectory is pinned across machines."""
    from alignkit.algos import rm
    from alignkit.algos.grpo import GRPOConfig
    from alignkit.algos.grpo import train as grpo_train
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig
    from alignkit.online import RolloutConfig
    from alignkit.rewards import RewardModelSource

    data = write_jsonl(tmp_path / "bon.jsonl", _bon_rows(80, 1))
    out = tmp_path / "label"
    label(LabelConfig(data=DataConfig(data=str(data)), judge="test_feedback:more_greats", pairs="all",
                      output_dir=str(out)))
    rm_dir = tmp_path / "rm"
    rm.train(rm.RMConfig(model=ModelConfig(model=str(tiny_model_dir)),
                         data=DataConfig(data=str(out / "pairs.jsonl"), max_length=64),
                         train=TrainConfig(output_dir=str(rm_dir), max_steps=30, batch_size=16, lr=3e-3,
                                           warmup_steps=2, report_to="none", progress=False, mixed_precision="no")))
    source = RewardModelSource(str(rm_dir))
    held_out = [" great great great film the plot", " great film and the plot movie", " bad film and the plot movie",
                " boring bad film and the plot"]
    scores = source(["Review number 999:"] * 4, held_out)
    assert scores[0] > scores[1] > max(scores[2], scores[3]), scores

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review number {i}:"} for i in range(16)])
    policy_out = tmp_path / "grpo"
    grpo_train(GRPOConfig(
        model=ModelConfig(model=str(peaked_model_dir)),
        data=DataConfig(data=str(prompts), eval_data=str(prompts), max_length=64),
        train=TrainConfig(output_dir=str(policy_out), lr=7e-3, batch_size=16, grad_accum=2, max_steps=8,
                          schedule="constant", report_to="none", progress=False, seed=0,
                          mixed_precision="no"),
        rollout=RolloutConfig(reward=str(rm_dir), eval_prompts=8, prompts_per_step=8, group_size=4, max_new_tokens=6),
    ))
    rows = [json.loads(line) for line in (policy_out / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0]["eval/reward/mean"], rows[-1]["eval/reward/mean"]
    assert after > before, (before, after)

    from alignkit.models import load_model
    from alignkit.rollout import SamplingConfig, sample

    def great_share(path) -> float:
        model, tokenizer = load_model(str(path))
        ids = [tokenizer(f"Review number {i}:")["input_ids"] for i in range(16)] * 4
        r = sample(model, ids, SamplingConfig(max_new_tokens=6), tokenizer=tokenizer,
                   generator=torch.Generator().manual_seed(5))
        words = " ".join(tokenizer.batch_decode(r.response_ids, skip_special_tokens=True)).split()
        return words.count("great") / len(words)

    assert great_share(policy_out) > great_share(peaked_model_dir) + 0.05


# --------------------------------------------------------------------------------------------- critique


def test_critique_on_a_tiny_model_writes_sft_pairs_and_chains(tmp_path, tiny_model_dir, tiny):
    out = tmp_path / "cai"
    assert main(["critique", "--model", str(tiny_model_dir), "--data", "bundled:instructions_test",
                 "--max-prompts", "3", "--rounds", "2", "--max-new-tokens", "6", "--sample-initial",
                 "--output-dir", str(out)]) == 0
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    names = {p.name for p in load_constitution()}
    assert len(chains) == 3
    for chain in chains:
        assert len(chain["rounds"]) == 2 and all(r["principle"] in names for r in chain["rounds"])
        # the conversation: prompt, initial, then (critique request, critique, revision request, revision) x 2
        turns = chain["conversation"][len(chain["prompt"]) :]
        assert len(turns) == 1 + 4 * 2 and turns[0]["content"] == chain["initial"]
        assert turns[-1]["content"] == chain["rounds"][-1]["revision"]
    _, tokenizer = tiny
    sft = read_examples(str(out / "sft.jsonl"), sft_example, tokenizer, 2048)
    assert len(sft) == len(load_records(str(out / "sft.jsonl"))) >= 1
    if (out / "pairs.jsonl").read_text():
        pairs = read_examples(str(out / "pairs.jsonl"), preference_example, tokenizer, 2048)
        assert all(e.chosen_ids != e.rejected_ids for e in pairs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["rounds"] == 2


# ------------------------------------------------------------------------------------ against alignkit serve


@pytest.fixture(scope="module")
def served_tiny(tiny_model_dir):
    """``alignkit serve``'s app over the tiny model, on a free loopback port, in a uvicorn thread."""
    import socket
    import threading
    import urllib.request

    import uvicorn

    from alignkit.models import load_model
    from alignkit.serve import ServeConfig, create_app

    model, tokenizer = load_model(str(tiny_model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, tokenizer, ServeConfig(model="tiny", port=port, dtype="fp32"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)
    yield url, model, tokenizer
    server.should_exit = True
    thread.join(timeout=10)


PROMPTS = ["Say hi.", "Name a colour, please, in one word.", "2+2?", "Write a haiku about rain."]
A = ["Hi!", "Blue.", "4, because two and two make four.", "Rain taps on the roof, the garden drinks"]
B = ["Hello there, nice to meet you.", "I like green very much.", "5", "no"]


def test_http_judge_on_alignkit_serve_equals_the_local_judge(served_tiny):
    """Completions mode with the judge model's tokenizer sends exactly the text the local judge scores; the
    server's candidate_logprobs give the same probabilities (8 concurrent requests, batched by the server)."""
    from alignkit.feedback import HTTPJudge

    url, model, tokenizer = served_tiny
    local = LocalLMJudge(model, tokenizer).compare(PROMPTS, A, B)
    judge = HTTPJudge(url, "tiny", tokenizer=tokenizer, concurrency=8)
    remote = judge.compare(PROMPTS, A, B)
    assert judge.supports_candidates
    for r, v in zip(remote, local, strict=True):
        assert r.p_ab == pytest.approx(v.p_ab, abs=1e-4) and r.p_ba == pytest.approx(v.p_ba, abs=1e-4)
        assert r.judge == f"http:{url}|tiny"


def test_http_judge_chat_mode_scores_the_first_assistant_token(served_tiny):
    """Chat mode: the server renders the chat template; P(first) = σ(logit "1" − logit "2") at the first assistant
    position after a user turn that ends with the ending (checked by a hand forward)."""
    from alignkit.feedback import HTTPJudge

    url, model, tokenizer = served_tiny
    verdicts = HTTPJudge(url, "tiny", mode="chat", concurrency=4).compare(PROMPTS[:2], A[:2], B[:2])
    for v, p, x, y in zip(verdicts, PROMPTS, A, B, strict=False):
        text = render(tokenizer, judge_request(p, x, y, v.principle) + f"\n\n{ENDING}")
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
        assert v.p_ab == pytest.approx(torch.sigmoid(logits[33] - logits[34]).item(), abs=1e-4)


def test_critique_through_an_http_endpoint(served_tiny, tmp_path, tiny):
    url, _, _ = served_tiny
    out = tmp_path / "cai-http"
    assert main(["critique", "--endpoint", f"{url}|tiny", "--data", "bundled:instructions_test", "--max-prompts", "2",
                 "--max-new-tokens", "5", "--temperature", "0", "--output-dir", str(out)]) == 0
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 2 and all(len(c["rounds"]) == 1 for c in chains)
    assert all(c["initial"] for c in chains)  # bundled instructions carry an answer: it is the initial response
    _, tokenizer = tiny
    assert len(read_examples(str(out / "sft.jsonl"), sft_example, tokenizer, 4096)) >= 1


def test_http_judge_sends_the_api_key_from_the_environment_and_retries_then_fails_in_one_line(
        tiny_model_dir, monkeypatch, tmp_path, capsys):
    import socket
    import threading

    import uvicorn

    from alignkit.feedback import HTTPJudge
    from alignkit.models import load_model
    from alignkit.serve import ServeConfig, create_app
    from alignkit.serve.client import RequestError, ServerError

    model, tokenizer = load_model(str(tiny_model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, ServeConfig(model="tiny", dtype="fp32"),
                                                      api_key="s3cret"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
        with pytest.raises(RequestError, match="HTTP 401"):
            HTTPJudge(url, "tiny", api_key_env="JUDGE_TEST_KEY").compare(["Q"], ["a"], ["b"])
        monkeypatch.setenv("JUDGE_TEST_KEY", "s3cret")
        v = HTTPJudge(url, "tiny", api_key_env="JUDGE_TEST_KEY").compare(["Q"], ["a"], ["b"])[0]
        assert 0 < v.p_ab < 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # nothing listens there any more: retried with back-off, then one clear error
    judge = HTTPJudge(url, "tiny", retries=2, timeout=2)
    judge.client.backoff = 0.01
    start = time.time()
    with pytest.raises(ServerError, match=r"unreachable after 3 attempts"):
        judge.compare(["Q"], ["a"], ["b"])
    assert time.time() - start < 10
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    assert main(["label", "--data", str(data), "--judge", f"{url}|tiny", "--retries", "0",
                 "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"alignkit: error: --judge {url}|tiny: ") and "unreachable after 1 attempts" in err


def test_hard_labels_keep_the_winner_and_drop_ties(tmp_path):
    """--labels hard: label 1 for the judge's winner (its P kept in the metadata), ties (P = ½) dropped; soft keeps
    P itself. The VADER judge is Bradley–Terry on VADER's compound score: a tie when both responses score 0."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "The film", "responses": ["was awful and boring.", "was a wonderful delight."]},
        {"prompt": "The plot", "responses": ["is a table.", "is a chair."]}])  # both VADER 0: a tie
    soft, hard = tmp_path / "soft", tmp_path / "hard"
    assert main(["label", "--data", str(data), "--judge", "reward:vader", "--output-dir", str(soft)]) == 0
    assert main(["label", "--data", str(data), "--judge", "reward:vader", "--labels", "hard",
                 "--output-dir", str(hard)]) == 0
    soft_rows = [json.loads(line) for line in (soft / "pairs.jsonl").read_text().splitlines()]
    hard_rows = [json.loads(line) for line in (hard / "pairs.jsonl").read_text().splitlines()]
    assert [r["label"] for r in soft_rows][1] == 0.5 and 0.5 < soft_rows[0]["label"] < 1.0
    assert len(hard_rows) == 1 and hard_rows[0]["label"] == 1.0
    assert hard_rows[0]["chosen"] == "was a wonderful delight." == soft_rows[0]["chosen"]
    assert hard_rows[0]["judge"]["p"] == pytest.approx(soft_rows[0]["label"])
    summary = json.loads((hard / "summary.json").read_text())
    assert summary["labels"] == "hard" and summary["dropped_below_min_label"] == 1
    assert main(["label", "--data", str(data), "--judge", "reward:vader", "--labels", "firm",
                 "--output-dir", str(tmp_path / "x")]) == 1
