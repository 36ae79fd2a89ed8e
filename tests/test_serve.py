"""alignkit serve: a real uvicorn server on loopback around a tiny model, the official `openai` client against it,
and alignkit.serve.client against it and against a second, deliberately failing server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import free_port, serving
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from alignkit.models import tiny_causal_lm
from alignkit.serve import ServeConfig, create_app
from alignkit.serve.client import Client, RequestError, ServerError

NAME = "tiny"
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=64)
    # Random init gives near-uniform next-token distributions, where greedy could flip on a rounding
    # difference; scaling the (tied) embedding sharpens every distribution 8x so greedy answers are stable.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return model, tokenizer


@pytest.fixture(scope="module")
def server(lm):
    model, tokenizer = lm
    # fp32 pinned: greedy == HF generate and log-probs == a direct forward are exactness claims (a native-bf16
    # CPU would otherwise sample in bf16 under dtype auto)
    app = create_app(model, tokenizer, ServeConfig(model=NAME, max_tokens_cap=64, max_body_bytes=20_000,
                                                    batch_wait_ms=20, dtype="fp32"))
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-softmax of one unpadded forward: row t predicts token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def hf_greedy(model, tokenizer, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------- endpoints


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "alignkit"


def test_completion_greedy_is_hf_greedy(lm, client):
    """temperature 0 = greedy decoding: the same tokens as transformers' generate(do_sample=False)."""
    model, tokenizer = lm
    prompt = "The weather today is"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = hf_greedy(model, tokenizer, ids, 12)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    [choice] = r.choices
    ended = expected[-1] == tokenizer.eos_token_id
    assert choice.text == tokenizer.decode(expected[:-1] if ended else expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if ended else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(ids) + len(expected)


def test_chat_uses_the_chat_template(lm, client):
    """A chat request = a completion of the template-rendered conversation; n copies; usage counts them."""
    model, tokenizer = lm
    ids = chat_ids(tokenizer, CHAT)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10, temperature=0, n=3)
    assert r.object == "chat.completion" and len(r.choices) == 3
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.role == "assistant" and c.message.content == by_ids.choices[0].text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 3 * by_ids.usage.completion_tokens


def test_multiple_prompts_and_n(client):
    r = client.completions.create(model=NAME, prompt=["One", "Two words"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0).choices[0].text
               for p in ("One", "Two words")]
    assert [c.text for c in r.choices] == [singles[0], singles[0], singles[1], singles[1]]


def test_stream_concatenates_to_the_plain_answer(client):
    plain = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    plain = client.completions.create(model=NAME, prompt="Once upon", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="Once upon", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert len(chunks) == plain.usage.completion_tokens  # one chunk per generated token (an EOS: its own, last)


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=NAME, prompt="Once upon", max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_min_tokens_bans_eos_until_then(lm, client):
    """vLLM's min_tokens. The EOS row of the tied embedding is set to 1.5x the row of the greedy first token,
    so EOS becomes the greedy choice: a plain request ends at once, min_tokens 5 goes on to exactly 5 tokens."""
    model, tokenizer = lm
    ids = tokenizer("Hi there", add_special_tokens=False)["input_ids"]
    first = int(forward_logprobs(model, ids)[-1].argmax())
    weight, eos = model.lm_head.weight, tokenizer.eos_token_id
    saved = weight[eos].clone()
    try:
        with torch.no_grad():
            weight[eos] = 1.5 * weight[first]
        plain = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0)
        assert plain.choices[0].text == "" and plain.choices[0].finish_reason == "stop"
        assert plain.usage.completion_tokens == 1
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0,
                                      extra_body={"min_tokens": 5})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    finally:
        with torch.no_grad():
            weight[eos] = saved
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2, extra_body={"min_tokens": 3})


def test_seed_makes_sampling_repeatable(client):
    def draw(seed):
        r = client.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=1.0, seed=seed, n=3)
        return [c.text for c in r.choices]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


# ------------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunks", [None, (3, 12)], ids=["one-forward", "chunked"])
def test_completion_logprobs_equal_a_direct_forward(lm, client, monkeypatch, chunks):
    """echo + logprobs 3 on two prompts of different lengths: every token's log-prob and the top 3 equal an
    unpadded forward of the model. `chunked` runs the scoring in row groups of <= 12 padded tokens and head
    chunks of 3 positions."""
    if chunks:
        from alignkit.serve import engine

        monkeypatch.setattr(engine, "HEAD_CHUNK", chunks[0])
        monkeypatch.setattr(engine, "SCORE_TOKENS", chunks[1])
    model, tokenizer = lm
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("The weather today is", "Hi")]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, logprobs=3, echo=True)
    for ids, choice in zip(prompts, r.choices):
        lp = choice.logprobs
        seq = ids + hf_greedy(model, tokenizer, ids, 6)
        reference = forward_logprobs(model, seq)
        # echo: every prompt token after the first, then the response; the first prompt token has none
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.token_logprobs) == len(seq)
        want = reference[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4)
        for t, top in enumerate(lp.top_logprobs[1:]):
            values, indices = reference[t].topk(3)
            expected = {tokenizer.decode([i]): v for i, v in zip(indices.tolist(), values.tolist())}
            assert top.keys() == expected.keys()
            assert all(abs(top[k] - expected[k]) < 1e-4 for k in top)
        assert lp.tokens == [tokenizer.decode([i]) for i in seq]
        assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(seq))]
        assert choice.text == tokenizer.decode(seq)


def test_chat_logprobs_equal_a_direct_forward(lm, client):
    model, tokenizer = lm
    ids = chat_ids(tokenizer, CHAT)
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    response = hf_greedy(model, tokenizer, ids, 5)
    assert len(content) == len(response) - (response[-1] == tokenizer.eos_token_id)
    reference = forward_logprobs(model, ids + response)
    for t, c in enumerate(content):
        position = len(ids) - 1 + t
        assert abs(c.logprob - reference[position, response[t]].item()) < 1e-4
        values = reference[position].topk(2).values.tolist()
        assert [round(x.logprob, 4) for x in c.top_logprobs] == [round(v, 4) for v in values]
        assert bytes(c.bytes).decode() == c.token


def test_candidate_logprobs_are_the_next_token_distribution(lm, client):
    """candidate_logprobs = log_softmax of the logits after the prompt, at each candidate's id, on both
    endpoints, even when the sampled token is something else."""
    model, tokenizer = lm
    prompt = "Answer 1 or 2:"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    candidates = ["1", "2", " the"]
    expected = forward_logprobs(model, ids)[-1, [tokenizer.convert_tokens_to_ids(t) for t in ("1", "2", "Ġthe")]]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=1.0,
                                  extra_body={"candidate_tokens": candidates})
    got = r.choices[0].model_extra["candidate_logprobs"]
    assert list(got) == candidates
    assert torch.allclose(torch.tensor(list(got.values())), expected, atol=1e-4)

    chat_expected = forward_logprobs(model, chat_ids(tokenizer, CHAT))[-1, [33, 34]]
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=3, temperature=0,
                                       extra_body={"candidate_tokens": ["1", "2"]})
    got = r.choices[0].model_extra["candidate_logprobs"]
    assert torch.allclose(torch.tensor([got["1"], got["2"]]), chat_expected, atol=1e-4)


def test_candidate_that_is_not_one_token_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=1, extra_body={"candidate_tokens": ["1", "12"]})
    assert e.value.status_code == 400 and "'12' is 2 tokens" in e.value.message


# -------------------------------------------------------------------------------------------------- batching


def test_64_concurrent_clients_get_64_answers(server, client):
    url, app = server
    engine = app.state.engine
    greedy = client.completions.create(model=NAME, prompt="Client 0", max_tokens=6, temperature=0).choices[0].text
    before = len(engine.batches)

    def ask(i: int):
        if i % 2:
            r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Hi {i}"}],
                                               max_tokens=4 + i % 5, temperature=0.8)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        r = client.completions.create(model=NAME, prompt=f"Client {i % 4}", max_tokens=6, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, range(64)))
    assert len(answers) == 64
    for i, (text, finish, n_tokens) in enumerate(answers):
        assert isinstance(text, str) and finish in ("stop", "length") and 1 <= n_tokens <= 8
        if i % 8 == 0:  # the same greedy prompt as above: the same answer whatever it was batched with
            assert text == greedy
    sizes = engine.batches[before:]
    assert sum(sizes) == 64 and max(sizes) > 1  # requests were decoded together


# ------------------------------------------------------------------------------------------ bad requests


def expect_error(response: httpx.Response, status: int, param: str | None = None, words: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_malformed_requests_get_openai_style_4xx(server):
    url = server[0] + "/v1"
    ok = {"model": NAME, "prompt": "x", "max_tokens": 2}
    with httpx.Client(timeout=30) as http:
        expect_error(http.post(url + "/completions", content=b"{not json"), 400, words="not valid JSON")
        expect_error(http.post(url + "/completions", content=b"[1, 2]"), 400, words="JSON object")
        expect_error(http.post(url + "/completions", json={**ok, "max_tokens": 65}), 400, "max_tokens", "between 1 and 64")
        expect_error(http.post(url + "/completions", json={**ok, "max_tokens": "5"}), 400, "max_tokens")
        expect_error(http.post(url + "/completions", json={**ok, "temperature": "hot"}), 400, "temperature")
        expect_error(http.post(url + "/completions", json={**ok, "temperature": 3}), 400, "temperature")
        expect_error(http.post(url + "/completions", json={**ok, "logprobs": 21}), 400, "logprobs")
        expect_error(http.post(url + "/completions", json={**ok, "n": 100}), 400, "n")
        expect_error(http.post(url + "/completions", json={**ok, "prompt": [99999999]}), 400, "prompt")
        expect_error(http.post(url + "/completions", json={**ok, "prompt": ""}), 400, "prompt", "empty")
        expect_error(http.post(url + "/completions", json={"model": NAME}), 400, "prompt", "missing")
        expect_error(http.post(url + "/chat/completions", json={"model": NAME}), 400, "messages", "missing")
        expect_error(http.post(url + "/chat/completions", json={"model": NAME, "messages": [{"role": "user"}]}),
                     400, "messages.0.content")
        expect_error(http.post(url + "/chat/completions", json={"model": NAME, "messages": CHAT, "top_logprobs": 2}),
                     400, "top_logprobs")
        expect_error(http.post(url + "/completions", json={**ok, "model": "gpt-9"}), 404, "model", "not served")
        expect_error(http.post(url + "/completions", json={**ok, "prompt": "x" * 30_000}), 413, words="bytes")
        expect_error(http.post(url + "/nowhere", json=ok), 404)
        expect_error(http.get(url + "/completions"), 405)
        # after all that the server still answers
        assert http.post(url + "/completions", json=ok).status_code == 200


def test_body_over_the_limit_without_content_length_is_a_413(server):
    """A chunked upload (no Content-Length) is counted as it arrives."""
    def chunks():
        for _ in range(30):
            yield b" " * 1000

    with httpx.Client(timeout=30) as http:
        expect_error(http.post(server[0] + "/v1/completions", content=chunks()), 413)


def test_api_key_and_busy_server(lm):
    model, tokenizer = lm
    config = ServeConfig(model=NAME, max_pending=1, batch_wait_ms=1500)
    app = create_app(model, tokenizer, config, api_key="s3cret")
    with serving(app) as url:
        body = {"model": NAME, "prompt": "x", "max_tokens": 1}
        with httpx.Client(timeout=30) as http:
            expect_error(http.post(url + "/v1/completions", json=body), 401, words="API key")
            expect_error(http.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
            good = {"Authorization": "Bearer s3cret"}
            assert http.get(url + "/v1/models", headers=good).status_code == 200
            # the first request waits 1.5 s for company in the batcher; a second one meanwhile is refused
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(http.post, url + "/v1/completions", json=body, headers=good)
                while app.state.engine.pending == 0:
                    time.sleep(0.01)
                busy = http.post(url + "/v1/completions", json=body, headers=good)
                expect_error(busy, 429)
                assert busy.headers["retry-after"] == "1"
                assert first.result().status_code == 200
        with openai.OpenAI(base_url=url + "/v1", api_key="s3cret") as authed:
            assert authed.completions.create(model=NAME, prompt="x", max_tokens=1).choices[0].finish_reason


# ------------------------------------------------------------------------------------------------ the client


def test_client_against_the_server(lm, server):
    model, tokenizer = lm
    with Client(server[0], timeout=60) as c:
        assert c.model == NAME
        results = c.complete(["Answer 1 or 2:", "Once upon"], max_tokens=3, logprobs=2, candidate_tokens=["1", "2"])
        assert len(results) == 2 and all(len(r.token_logprobs) == len(r.tokens) for r in results)
        ids = tokenizer("Answer 1 or 2:", add_special_tokens=False)["input_ids"]
        expected = forward_logprobs(model, ids)[-1, [33, 34]].tolist()
        got = results[0].candidate_logprobs
        assert abs(got["1"] - expected[0]) < 1e-4 and abs(got["2"] - expected[1]) < 1e-4
        [chat] = c.chat([CHAT], max_tokens=4, logprobs=1)
        assert chat.text == "".join(chat.tokens) and all(len(t) == 1 for t in chat.top_logprobs)
        with pytest.raises(RequestError, match="HTTP 400: max_tokens"):
            c.complete(["x"], max_tokens=10_000)


def flaky_app(failures: int, status: int) -> tuple[FastAPI, list[int]]:
    """A server whose first `failures` answers are `status`, then a valid completion; `calls` counts requests."""
    app, calls = FastAPI(), []

    @app.post("/v1/completions")
    async def completions():
        calls.append(1)
        if len(calls) <= failures:
            return JSONResponse({"error": {"message": f"failure {len(calls)}", "type": "x", "param": None,
                                           "code": None}}, status_code=status)
        return {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}]}

    return app, calls


@pytest.mark.parametrize("status", [503, 429, 500])
def test_client_retries_server_failures(status):
    app, calls = flaky_app(failures=2, status=status)
    with serving(app) as url, Client(url, model="m", retries=3, backoff=0.01) as c:
        [result] = c.complete(["x"])
        assert result.text == "ok" and len(calls) == 3


def test_client_gives_up_and_does_not_retry_4xx():
    app, calls = flaky_app(failures=10, status=502)
    with serving(app) as url, Client(url, model="m", retries=2, backoff=0.01) as c:
        with pytest.raises(ServerError, match="HTTP 502 after 3 attempts: failure 3"):
            c.complete(["x"])
    assert len(calls) == 3
    app, calls = flaky_app(failures=10, status=400)
    with serving(app) as url, Client(url, model="m", retries=2, backoff=0.01) as c:
        with pytest.raises(RequestError, match="failure 1"):
            c.complete(["x"])
    assert len(calls) == 1


def test_client_retries_connection_errors():
    """Nothing listens at first; a server comes up during the back-off and the request succeeds."""
    port = free_port()
    app, calls = flaky_app(failures=0, status=200)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Timer(0.3, server.run)
    thread.start()
    try:
        with Client(f"http://127.0.0.1:{port}/v1", model="m", retries=6, backoff=0.1, api_key="k") as c:
            assert c.complete(["x"])[0].text == "ok" and len(calls) == 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    with Client(f"http://127.0.0.1:{free_port()}", model="m", retries=1, backoff=0.01) as c:
        with pytest.raises(ServerError, match="unreachable after 2 attempts"):
            c.complete(["x"])


def test_client_concurrency_limit():
    """With max_concurrency 3, never more than 3 requests are in flight at the server."""
    app, state = FastAPI(), {"now": 0, "peak": 0}

    @app.post("/v1/completions")
    async def completions():
        import asyncio

        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}

    with serving(app) as url, Client(url, model="m", max_concurrency=3) as c:
        assert [r.text for r in c.complete(["x"] * 12)] == ["ok"] * 12
    assert state["peak"] == 3


# ---------------------------------------------------------------------------------------------------- the CLI


def test_cli_serves_a_model_dir_with_an_api_key(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "MY_KEY": "k123", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve", "--model", str(tiny_model_dir),
                             "--served-name", "tiny-dir", "--port", str(port), "--api-key-env", "MY_KEY"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                response = httpx.get(url + "/models", headers={"Authorization": "Bearer k123"}, timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert response.json()["data"][0]["id"] == "tiny-dir"
        assert httpx.get(url + "/models", timeout=5).status_code == 401
        r = httpx.post(url + "/chat/completions", headers={"Authorization": "Bearer k123"}, timeout=60,
                       json={"model": "tiny-dir", "messages": CHAT, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_rejects_a_missing_key_variable_or_model(capsys, tmp_path):
    from alignkit.cli import main

    os.environ.pop("NO_SUCH_KEY_VAR", None)
    assert main(["serve", "--api-key-env", "NO_SUCH_KEY_VAR"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["alignkit: error: --api-key-env NO_SUCH_KEY_VAR: that environment variable is not set or empty"]
    assert main(["serve", "--model", str(tmp_path / "no-such-model")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"alignkit: error: --model {tmp_path / 'no-such-model'}: cannot load it")
