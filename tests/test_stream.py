"""Live streaming: the sampler's per-step hook, and `alignkit serve` sending each token as it is decoded, checked
with the official `openai` client against a real uvicorn server on loopback around a tiny model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import serving

from alignkit.models import tiny_causal_lm
from alignkit.rollout import SamplingConfig, sample
from alignkit.serve import ServeConfig, create_app

NAME = "tiny"
CHAT = [{"role": "user", "content": "Name a colour."}]
LONG = 200  # tokens of the "live" requests: long enough that the first chunk comes well before the last


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=64)
    with torch.no_grad():  # sharper distributions: greedy answers do not flip on rounding (as in test_serve)
        model.model.embed_tokens.weight.mul_(8.0)
    return model, tokenizer


@pytest.fixture(scope="module")
def server(lm):
    model, tokenizer = lm
    app = create_app(model, tokenizer, ServeConfig(model=NAME, max_tokens_cap=512, batch_wait_ms=20, dtype="fp32"))
    with serving(app) as url:
        yield url, app.state.engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


# ------------------------------------------------------------------------------------------- the sampler hook


@pytest.mark.parametrize("fast", [True, False], ids=["plain-torch", "generic"])
def test_step_hook_sees_every_token_as_it_is_drawn(lm, fast):
    model, tokenizer = lm
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("Once upon a time", "Hi", "The film")]
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, dtype="fp32", fast=fast)
    plain = sample(model, prompts, config, tokenizer=tokenizer, generator=torch.Generator().manual_seed(3))
    seen: dict[int, list[int]] = {b: [] for b in range(len(prompts))}
    first_logits = {}

    def hook(t, rows, tokens, logits):
        assert len(seen[0]) == t or not rows.eq(0).any()  # called once per step, in order
        for b, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            seen[b].append(token)
        if t == 0:
            first_logits.update(zip(rows.tolist(), logits.clone()))

    hooked = sample(model, prompts, config, tokenizer=tokenizer, generator=torch.Generator().manual_seed(3),
                    on_step=hook, step_logits=True)
    # the hook changes nothing: same random stream, same rollout
    assert torch.equal(hooked.response_ids, plain.response_ids) and torch.equal(hooked.logprobs, plain.logprobs)
    for b, prompt in enumerate(prompts):
        n = int(plain.response_mask[b].sum())
        assert seen[b][:n] == plain.response_ids[b, :n].tolist()
        # the step's logits are the model's own (before temperature/filtering): those of a plain forward
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0, -1].float()
        assert torch.allclose(first_logits[b], want, atol=1e-4)


def test_step_hook_can_stop_the_batch(lm):
    model, tokenizer = lm
    config = SamplingConfig(max_new_tokens=20, min_new_tokens=20, greedy=True, dtype="fp32")
    steps = []

    def hook(t, rows, tokens, logits):
        assert logits is None  # step_logits=False: no copy of the logits is made
        steps.append(t)
        return t == 4

    out = sample(model, [[1, 2, 3], [4, 5]], config, tokenizer=tokenizer, on_step=hook)
    assert steps == [0, 1, 2, 3, 4] and out.response_ids.shape[1] == 5
    full = sample(model, [[1, 2, 3], [4, 5]], config, tokenizer=tokenizer)
    assert torch.equal(out.response_ids, full.response_ids[:, :5])


# ------------------------------------------------------------------------------------------- the server


def _timed(stream) -> list[tuple[float, object]]:
    return [(time.perf_counter(), chunk) for chunk in stream]


def test_chunks_arrive_while_the_batch_decodes(server, client):
    """A 200-token greedy completion: 200 chunks, one per token; the first arrives while the engine has run only a
    fraction of the steps, long before the last; the text equals the non-streamed answer."""
    engine = server[1]
    options = dict(model=NAME, prompt="Once upon", max_tokens=LONG, temperature=0, extra_body={"min_tokens": LONG})
    plain = client.completions.create(**options)
    start_steps, start = engine.steps, time.perf_counter()
    steps_at_first = None
    arrivals, texts = [], []
    for chunk in client.completions.create(**options, stream=True):
        if steps_at_first is None:
            steps_at_first = engine.steps - start_steps
        arrivals.append(time.perf_counter() - start)
        texts.append(chunk.choices[0].text)
    assert len(arrivals) == LONG == plain.usage.completion_tokens
    assert "".join(texts) == plain.choices[0].text
    assert steps_at_first < LONG / 2, steps_at_first
    assert arrivals[0] < arrivals[-1] / 2, (arrivals[0], arrivals[-1])
    assert engine.steps - start_steps == LONG


def test_chat_stream_n2_logprobs_and_usage(client):
    options = dict(model=NAME, messages=CHAT, max_tokens=24, temperature=0, n=2, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        want = plain.choices[index]
        assert "".join(c.delta.content or "" for c in mine) == want.message.content
        assert [c.finish_reason for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1].finish_reason == want.finish_reason
        streamed = [lp for c in mine if c.logprobs for lp in c.logprobs.content]
        assert [lp.token for lp in streamed] == [lp.token for lp in want.logprobs.content]
        for got, ref in zip(streamed, want.logprobs.content, strict=True):
            assert abs(got.logprob - ref.logprob) < 1e-4
            assert [t.token for t in got.top_logprobs] == [t.token for t in ref.top_logprobs]
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got.top_logprobs, ref.top_logprobs,
                                                                           strict=True))
        # one chunk per generated token after the role chunk (the EOS's chunk, if any, carries finish_reason)
        tokens_of_choice = len(want.logprobs.content) + (want.finish_reason == "stop")
        assert len(mine) - 1 == tokens_of_choice


def test_stop_string_across_a_chunk_border(client):
    """The stop string spans two tokens: the stream holds back its first half, never sends any of it, and ends at
    the token that completes it, with the same text as the non-streamed answer."""
    options = dict(model=NAME, prompt="Once upon", max_tokens=40, temperature=1.0, seed=5)  # seeded: repeatable
    full = client.completions.create(**options, logprobs=0)
    tokens = full.choices[0].logprobs.tokens
    k = next(i for i in range(3, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2
             and tokens[i][-2:] + tokens[i + 1][:2] not in "".join(tokens[: i]))
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    text = full.choices[0].text
    expected = text[: text.find(stop)]
    plain = client.completions.create(**options, stop=[stop])
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**options, stop=[stop], stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == expected
    assert len(chunks) == k + 2  # tokens 0..k+1: the stream ends at the token completing the stop string
    # by token k the stream had sent everything before the stop string but not token k's last two characters
    # (they might have begun the stop string: held back, then dropped once token k + 1 completed it)
    assert "".join(pieces[: k + 1]) == expected == "".join(tokens[: k + 1])[:-2]
    assert pieces[k + 1] == "" and chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream_echo_logprobs_and_candidates(client):
    options = dict(model=NAME, prompt=["The weather today is", "Hi"], max_tokens=6, temperature=0, logprobs=2,
                   echo=True, extra_body={"candidate_tokens": ["1", "2"]})
    plain = client.completions.create(**options)
    chunks = list(client.completions.create(**options, stream=True))
    for index, want in enumerate(plain.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.text for c in mine) == want.text
        got = {"tokens": [], "token_logprobs": [], "text_offset": []}
        for c in mine:
            if c.logprobs:
                for key in got:
                    got[key] += getattr(c.logprobs, key)
        assert got["tokens"] == want.logprobs.tokens and got["text_offset"] == want.logprobs.text_offset
        assert got["token_logprobs"][0] is None
        assert torch.allclose(torch.tensor(got["token_logprobs"][1:]), torch.tensor(want.logprobs.token_logprobs[1:]),
                              atol=1e-4)
        candidates = mine[-1].model_extra["candidate_logprobs"]
        for token, value in want.model_extra["candidate_logprobs"].items():
            assert abs(candidates[token] - value) < 1e-4


def test_a_client_that_leaves_stops_its_rows(server, client):
    engine = server[1]
    before = engine.steps
    stream = client.completions.create(model=NAME, prompt="Once upon", max_tokens=LONG, temperature=0, stream=True,
                                       extra_body={"min_tokens": LONG})
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while engine.pending and time.time() < deadline:
        time.sleep(0.01)
    assert engine.pending == 0 and engine.steps - before < LONG


def test_requests_during_a_batch_join_the_next_one(server, client):
    """While a long stream decodes, three requests arrive: they wait, and run together as the next batch."""
    engine = server[1]
    stream = client.completions.create(model=NAME, prompt="Once upon", max_tokens=LONG, temperature=0, stream=True,
                                       extra_body={"min_tokens": LONG})
    chunks = iter(stream)
    next(chunks)
    batches = len(engine.batches)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.completions.create, model=NAME, prompt=f"Request {i}", max_tokens=4,
                               temperature=0) for i in range(3)]
        deadline = time.time() + 30
        while engine.pending < 4 and time.time() < deadline:  # all three queued behind the stream
            time.sleep(0.005)
        rest = list(chunks)
        answers = [f.result() for f in futures]
    assert len(rest) == LONG - 1 and all(a.choices[0].text is not None for a in answers)
    assert engine.batches[batches:] == [1, 3]  # the stream's batch, then the three together
