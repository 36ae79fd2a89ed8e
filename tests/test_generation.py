"""``--generator http://...``: best-of-N sampled by a real ``alignkit serve`` on loopback, for string and chat
prompts; the files it writes are the same shape as the builtin sampler's; a bad spec is a one-line error."""

from __future__ import annotations

import json

import pytest
from conftest import serving, write_jsonl

from alignkit.algos import bon
from alignkit.cli import main
from alignkit.config import DataConfig, ModelConfig
from alignkit.data import preference_example, ranked_example, read_examples
from alignkit.models import load_model
from alignkit.online import RolloutConfig
from alignkit.rewards import length_reward
from alignkit.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    with serving(create_app(model, tokenizer, ServeConfig(model="tiny", batch_wait_ms=10))) as url:
        yield url + "/v1"


@pytest.mark.parametrize("shape", ["string", "messages"])
def test_bon_through_an_openai_compatible_endpoint(endpoint, tiny_model_dir, tmp_path, shape):
    prompts = [f"Review {i}:" if shape == "string" else [{"role": "user", "content": f"Review {i}:"}] for i in range(3)]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])

    def run(out: str):
        return bon.run(bon.BoNConfig(model=ModelConfig(model=str(tiny_model_dir)),
                                     data=DataConfig(data=str(data), max_length=64),
                                     rollout=RolloutConfig(reward="length:4", prompts_per_step=2, group_size=3,
                                                           max_new_tokens=6),
                                     output_dir=str(tmp_path / out), generator=endpoint + "|tiny", seed=5))

    result = run("a")
    records = [json.loads(line) for line in (tmp_path / "a" / "bon.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        texts = [t if isinstance(t, str) else t[0]["content"] for t in r["responses"]]
        assert len(texts) == 3 and any(texts)
        # each score is the reward of the text the endpoint returned
        assert r["scores"] == length_reward(target=4)([r["prompt"]] * 3, texts).tolist()
        assert r["reward"] == max(r["scores"])
    assert result.n == 3
    tokenizer = load_model(str(tiny_model_dir))[1]
    assert len(read_examples(str(tmp_path / "a" / "bon.jsonl"), ranked_example, tokenizer, None)) == 3
    if (tmp_path / "a" / "pairs.jsonl").read_text():
        read_examples(str(tmp_path / "a" / "pairs.jsonl"), preference_example, tokenizer, None)
    run("b")  # the per-prompt seeds make the endpoint's samples repeat
    assert (tmp_path / "a" / "bon.jsonl").read_text() == (tmp_path / "b" / "bon.jsonl").read_text()


def test_bad_generator_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    assert main(["bon", "--data", str(data), "--generator", "ftp://x", "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--generator" in err[0] and "http://HOST:PORT/v1" in err[0]
    assert not (tmp_path / "out").exists()
