"""The bundled datasets hold what alignkit/bundled/README.md says they hold."""

from __future__ import annotations

import json
import statistics

import pytest

from alignkit.bundled import available, bundled_path
from alignkit.rewards.functions import vader_compound


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in bundled_path(name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name, count", [("instructions_train", 318), ("instructions_test", 62),
                                         ("movie_prompts_train", 200), ("movie_prompts_test", 40)])
def test_counts_and_names(name, count):
    assert len(_records(name)) == count
    assert name in available()
    assert bundled_path(name.rsplit("_", 1)[0]) == bundled_path(name.rsplit("_", 1)[0] + "_train")


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        bundled_path("../../etc/passwd")


def test_instructions_are_one_user_turn_and_one_concise_answer():
    for split in ("instructions_train", "instructions_test"):
        for r in _records(split):
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant"]
            assert all(m["content"].strip() for m in r["messages"])
            assert len(r["messages"][1]["content"].split()) <= 63
    answers = [len(r["messages"][1]["content"].split()) for r in _records("instructions_train")]
    assert 15 <= statistics.median(answers) <= 30


def _texts(name: str) -> set[str]:
    """Every prompt and answer of a split, normalised."""
    out = set()
    for r in _records(name):
        contents = [m["content"] for m in r["messages"]] if "messages" in r else [r["prompt"]]
        out.update(c.strip().lower() for c in contents)
    return out


@pytest.mark.parametrize("dataset", ["instructions", "movie_prompts"])
def test_no_prompt_or_answer_in_both_splits(dataset):
    assert not _texts(f"{dataset}_train") & _texts(f"{dataset}_test")


def test_movie_openings_are_near_neutral():
    scores = [vader_compound(r["prompt"]) for s in ("movie_prompts_train", "movie_prompts_test") for r in _records(s)]
    assert max(abs(s) for s in scores) <= 0.3
    assert abs(statistics.mean(scores)) < 0.05
    assert sum(s == 0 for s in scores) / len(scores) > 0.9
    for s in ("movie_prompts_train", "movie_prompts_test"):
        assert all(5 <= len(r["prompt"].split()) <= 15 for r in _records(s))
