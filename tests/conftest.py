"""Shared fixtures: a tiny random llama saved to disk (real code paths in seconds), small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from alignkit.models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=64)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
