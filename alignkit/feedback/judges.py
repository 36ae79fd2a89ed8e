"""Pairwise judges: (prompt, response A, response B) -> P(A preferred), scored in both orders and averaged.

RLAIF (Lee et al. 2023, https://arxiv.org/abs/2309.00267, sec. 2.1): the labeller reads a preamble, the two
responses and an ending such as "Preferred response:"; the preference is the softmax over the log-probs of the
answer tokens "1" and "2",

    P(first preferred) = exp(ℓ_1) / (exp(ℓ_1) + exp(ℓ_2)) = σ(ℓ_1 − ℓ_2).

LLM labellers favour a position (small ones keep the same position after a swap up to 56% of the time), so every
pair is judged in both orders and the two are averaged:

    p_ab = P(first preferred | A first),  p_ba = 1 − P(first preferred | B first),  p_a = (p_ab + p_ba) / 2.

A bias that adds δ to P(first preferred) in both orders cancels exactly: (p + δ + p − δ) / 2 = p. A pair is
position-consistent when the same response wins in both orders. Chain of thought (Lee et al. sec. 2.1.3):
generate a rationale, append it, then score the answer tokens.

Every judge has ``compare(prompts, responses_a, responses_b) -> list[Verdict]``. A kind implements only
``score_shown(items) -> [(P(first preferred), rationale)]`` for items shown in one order; ``compare`` does the
two orders, the averaging and the on-disk cache (``JudgeCache``), so an interrupted job asks nothing twice.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.data import DataError
from alignkit.feedback.cache import JudgeCache, cache_key
from alignkit.rewards.base import Prompt, prompt_text

PREAMBLE = ("You are a careful rater. Read the request and the two responses below, then decide which response "
            "is better according to the principle.")
DEFAULT_PRINCIPLE = "Which response is more helpful, honest and harmless?"
ENDING = "Preferred response:"
ANSWER_REQUEST = "Answer with 1 or 2."
COT_REQUEST = "Explain in one or two sentences which response is better and why."
COT_FOLLOW_UP = "So which response is preferred? Answer with 1 or 2."


@dataclass
class Verdict:
    p_a: float  # P(A preferred), debiased: (p_ab + p_ba) / 2
    p_ab: float  # P(A preferred) with A shown first
    p_ba: float  # P(A preferred) with B shown first: 1 − P(first preferred)
    consistent: bool  # the same response wins in both orders
    judge: str
    principle: str
    rationale: str = ""  # chain of thought with A shown first (empty without CoT)
    rationale_ba: str = ""  # chain of thought with B shown first


def combine(p_first_ab: float, p_first_ba: float) -> tuple[float, float, float, bool]:
    """(p_a, p_ab, p_ba, consistent) from P(first preferred) in the order A,B and in the order B,A."""
    p_ab, p_ba = p_first_ab, 1.0 - p_first_ba
    return (p_ab + p_ba) / 2, p_ab, p_ba, (p_ab > 0.5) == (p_ba > 0.5)


def judge_request(prompt: Prompt, first: str, second: str, principle: str, preamble: str = PREAMBLE,
                  cot: bool = False) -> str:
    """The judge's instructions and the two responses, as one user message."""
    return (f"{preamble}\n\nPrinciple: {principle}\n\nRequest: {prompt_text(prompt).strip()}\n\n"
            f"Response 1: {first.strip()}\n\nResponse 2: {second.strip()}\n\n{COT_REQUEST if cot else ANSWER_REQUEST}")


class Judge:
    """The shared part of every judge: both orders, averaging, cache. Subclasses set ``name`` (the judge's id in
    the cache key) and ``template`` (what else decides its answers: prompt format, CoT) and implement
    ``score_shown``."""

    name = "judge"
    template = ""

    def __init__(self, principle: str = DEFAULT_PRINCIPLE, cache: JudgeCache | None = None, batch_size: int = 16):
        self.principle = principle
        self.cache = cache
        self.batch_size = max(1, batch_size)
        self.calls = 0  # shown comparisons actually computed (cache misses)

    def score_shown(self, items: list[tuple[Prompt, str, str, str]]) -> list[tuple[float, str]]:
        """For (prompt, first, second, principle) items: (P(first preferred), rationale) each."""
        raise NotImplementedError

    def compare(self, prompts: Sequence[Prompt], responses_a: Sequence[str], responses_b: Sequence[str],
                principle: str | None = None, progress: Callable[[int, int], None] | None = None) -> list[Verdict]:
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"compare: got {len(prompts)} prompts, {len(responses_a)} A and {len(responses_b)} B responses")
        principle = self.principle if principle is None else principle
        n = len(prompts)
        # rows 0..n-1: A shown first; rows n..2n-1: B shown first
        items = [(p, a, b, principle) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]
        items += [(p, b, a, principle) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]
        keys = [cache_key(self.name, self.template, *item) for item in items]
        known = self.cache.get_many(keys) if self.cache is not None else {}
        results: dict[str, tuple[float, str]] = dict(known)
        missing = list(dict.fromkeys(k for k in keys if k not in results))  # duplicates asked once
        where = {k: i for i, k in reversed(list(enumerate(keys)))}
        # similar lengths share a batch (little padding); a pair's two orders (same length) sit side by side
        missing.sort(key=lambda k: (sum(len(prompt_text(x)) for x in items[where[k]][:3]), where[k] % n))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            answers = self.score_shown([items[where[k]] for k in chunk])
            self.calls += len(chunk)
            fresh = {k: (float(p), r) for k, (p, r) in zip(chunk, answers, strict=True)}
            for p, _ in fresh.values():
                if not (0.0 <= p <= 1.0) or math.isnan(p):
                    raise ValueError(f"judge {self.name} returned P(first preferred) = {p}, expected a probability")
            if self.cache is not None:
                self.cache.put_many(fresh)  # committed now: a killed job resumes after this chunk
            results.update(fresh)
            if progress is not None:
                progress(start + len(chunk), len(missing))
        verdicts = []
        for i in range(n):
            (p1, r1), (p2, r2) = results[keys[i]], results[keys[n + i]]
            p_a, p_ab, p_ba, consistent = combine(p1, p2)
            verdicts.append(Verdict(p_a, p_ab, p_ba, consistent, self.name, principle, r1, r2))
        return verdicts


# ------------------------------------------------------------------------------------------- local causal LM


def answer_tokens(tokenizer, ending: str = ENDING) -> tuple[str, int, int]:
    """(separator, id of "1", id of "2") such that after ``ending + separator`` each answer is exactly one token.

    BPE vocabularies differ: where " 1" is one token the separator is empty; SmolLM2 splits " 1" into " " + "1",
    so the prompt ends with "Preferred response: " and the answers are "1" and "2"."""
    for sep, answers in (("", (" 1", " 2")), (" ", ("1", "2"))):
        head = tokenizer(ending + sep, add_special_tokens=False)["input_ids"]
        ids = []
        for answer in answers:
            full = tokenizer(ending + sep + answer, add_special_tokens=False)["input_ids"]
            if len(full) == len(head) + 1 and full[: len(head)] == head:
                ids.append(full[-1])
        if len(ids) == 2 and ids[0] != ids[1]:
            return sep, ids[0], ids[1]
    raise ValueError(f"the judge tokenizer has no single-token answers for {ending!r} + '1'/'2'")


def render(tokenizer, request: str, prefill: str = "") -> str:
    """The request as a user turn of the tokenizer's chat template with ``prefill`` opening the assistant turn;
    plain text when there is no template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": request}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    return f"{request}\n\n{prefill}"


@torch.no_grad()
def last_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, V) fp32 next-token logits after each row: one left-padded no-grad forward, the LM head at the last
    position only (``logits_to_keep=1``)."""
    width = max(map(len, rows))
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device), logits_to_keep=1)
    return out.logits[:, -1].float().cpu()


class LocalLMJudge(Judge):
    """Any causal LM as the labeller: the bundled SmolLM2 by default, a hub id, a local directory or an alignkit
    run directory (``alignkit.models.load_model``), or a loaded ``model`` with its ``tokenizer``.

    P(first preferred) = σ(logit("1") − logit("2")) at the position after the ending (the softmax over the pair,
    so the rest of the vocabulary does not matter). With ``cot``, a rationale of up to ``cot_tokens`` tokens is
    first sampled greedily by the rollout sampler, then appended before the ending."""

    def __init__(self, model: Any = "smollm2-135m", tokenizer: Any = None, principle: str = DEFAULT_PRINCIPLE,
                 cache: JudgeCache | None = None, batch_size: int = 16, cot: bool = False, cot_tokens: int = 64,
                 preamble: str = PREAMBLE):
        super().__init__(principle, cache, batch_size)
        if isinstance(model, str):
            from alignkit.models import load_model

            model_name = model
            model, tokenizer = load_model(model)
            model.requires_grad_(False)  # ours, never trained: the sampler keeps its packed weights (rollout._decoder)
        else:
            model_name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        if tokenizer is None:
            raise ValueError("a loaded judge model needs its tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cot, self.cot_tokens, self.preamble = cot, cot_tokens, preamble
        self.sep, self.id_1, self.id_2 = answer_tokens(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.name = f"local:{model_name}"
        self.template = cache_key(preamble, ENDING, COT_REQUEST if cot else ANSWER_REQUEST, cot_tokens if cot else 0,
                                  getattr(tokenizer, "chat_template", None))

    def _ids(self, text: str) -> list[int]:
        templated = bool(getattr(self.tokenizer, "chat_template", None))  # a template renders its own specials
        return self.tokenizer(text, add_special_tokens=not templated)["input_ids"]

    def score_texts(self, texts: list[str]) -> list[float]:
        """P("1") / (P("1") + P("2")) as the next token after each text (which ends with ending + separator)."""
        logits = last_logits(self.model, [self._ids(t) for t in texts], self.pad_id)  # (B, V)
        return torch.sigmoid(logits[:, self.id_1] - logits[:, self.id_2]).tolist()

    def rationales(self, requests: list[str]) -> list[str]:
        from alignkit.rollout import SamplingConfig, sample

        config = SamplingConfig(max_new_tokens=self.cot_tokens, greedy=True, dtype="fp32")
        rollout = sample(self.model, [self._ids(render(self.tokenizer, r)) for r in requests], config,
                         tokenizer=self.tokenizer)
        ids = rollout.response_ids.masked_fill(rollout.response_mask == 0, self.pad_id)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def score_shown(self, items):
        requests = [judge_request(p, a, b, pr, self.preamble, self.cot) for p, a, b, pr in items]
        rationales = self.rationales(requests) if self.cot else [""] * len(items)
        texts = [render(self.tokenizer, q, (f"{r}\n" if self.cot else "") + ENDING + self.sep)
                 for q, r in zip(requests, rationales, strict=True)]
        return list(zip(self.score_texts(texts), rationales, strict=True))


# ------------------------------------------------------------------------------- OpenAI-compatible endpoint


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def pair_probability(token_logprobs: dict[str, float]) -> float | None:
    """P("1") / (P("1") + P("2")) from {token: log-prob} (top-logprobs of the first position; tokens are matched
    after stripping spaces). One of the two missing: its log-prob is taken as the smallest listed (a bound)."""
    ones = [lp for t, lp in token_logprobs.items() if t.strip() == "1"]
    twos = [lp for t, lp in token_logprobs.items() if t.strip() == "2"]
    if not ones and not twos:
        return None
    floor = min(token_logprobs.values())
    l1 = _logsumexp(ones) if ones else floor
    l2 = _logsumexp(twos) if twos else floor
    return 1.0 / (1.0 + math.exp(l2 - l1))


def parse_answer(text: str) -> float:
    """Last resort, the answer text: 1.0 if it names response 1 first, 0.0 for 2, 0.5 if neither."""
    match = re.search(r"\b([12])\b", text)
    return 0.5 if match is None else (1.0 if match.group(1) == "1" else 0.0)


class HTTPJudge(Judge):
    """A judge behind any OpenAI-compatible endpoint ``base_url`` (``http://host:port/v1``) serving ``model`` (None:
    the first one the server lists).

    Per shown pair, the first of these the server offers: (1) ``candidate_tokens: ["1", "2"]``, the
    ``alignkit serve`` extension that returns ``choices[0].candidate_logprobs`` for the first generated position;
    (2) ``top_logprobs`` of that position; (3) the answer text, parsed (a hard 0/1). ``mode="completions"`` sends
    the rendered text (through ``tokenizer``'s chat template when given, so it matches ``LocalLMJudge`` on the same
    model); ``mode="chat"`` sends a user message and lets the server apply its template. Time-outs, retries with
    back-off, the concurrency limit and the API key (from ``api_key_env``) are those of ``alignkit.serve.client``."""

    def __init__(self, base_url: str, model: str | None = None, principle: str = DEFAULT_PRINCIPLE,
                 cache: JudgeCache | None = None, batch_size: int = 16, cot: bool = False, cot_tokens: int = 64,
                 preamble: str = PREAMBLE, mode: str = "completions", tokenizer: Any = None,
                 api_key_env: str = "ALIGNKIT_API_KEY", timeout: float = 120.0, retries: int = 4, concurrency: int = 8):
        super().__init__(principle, cache, batch_size)
        from alignkit.serve.client import Client

        if mode not in ("completions", "chat"):
            raise ValueError(f"HTTP judge mode must be completions or chat, got {mode!r}")
        self.client = Client(base_url, model, api_key_env=api_key_env, timeout=timeout, retries=retries,
                             max_concurrency=concurrency)
        self.mode, self.tokenizer, self.concurrency = mode, tokenizer, concurrency
        self.cot, self.cot_tokens, self.preamble = cot, cot_tokens, preamble
        self.sep = answer_tokens(tokenizer)[0] if tokenizer is not None else " "
        self.candidates = ["1", "2"] if (self.sep == " " or mode == "chat") else [" 1", " 2"]
        self.supports_candidates = True  # switched off for good after a server rejects or ignores the field
        self.name = f"http:{base_url}|{model or ''}"
        self.template = cache_key(preamble, ENDING, COT_REQUEST if cot else ANSWER_REQUEST, cot_tokens if cot else 0,
                                  mode, getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)

    def _text(self, request: str, prefill: str) -> str:
        return render(self.tokenizer, request, prefill) if self.tokenizer is not None else f"{request}\n\n{prefill}"

    def _post(self, prompt: Any, max_tokens: int, score: bool) -> dict:
        """One request (completions: a text; chat: messages); the first choice as the server sent it."""
        from alignkit.serve.client import RequestError

        body: dict[str, Any] = {"model": self.client.model, "max_tokens": max_tokens, "temperature": 0.0}
        if self.mode == "completions":
            body["prompt"] = prompt
            if score:
                body["logprobs"] = 20
        else:
            body["messages"] = prompt
            if score:
                body.update(logprobs=True, top_logprobs=20)
        if score and self.supports_candidates:
            body["candidate_tokens"] = self.candidates
        path = "/completions" if self.mode == "completions" else "/chat/completions"
        try:
            answer = self.client.request("POST", path, body)
        except RequestError:
            if "candidate_tokens" not in body:
                raise
            self.supports_candidates = False  # a server that rejects unknown fields: ask again without it
            return self._post(prompt, max_tokens, score)
        if not isinstance(answer, dict) or not answer.get("choices"):
            raise ValueError(f"{self.client.base_url}{path}: expected an answer with 'choices', got {str(answer)[:200]}")
        return answer["choices"][0]

    def _probability(self, choice: dict) -> float:
        candidates = choice.get("candidate_logprobs")
        if isinstance(candidates, dict) and all(c in candidates for c in self.candidates):
            l1, l2 = (float(candidates[c]) for c in self.candidates)
            return 1.0 / (1.0 + math.exp(l2 - l1))
        self.supports_candidates = False
        logprobs = choice.get("logprobs") or {}
        top: dict[str, float] = {}
        if isinstance(logprobs.get("content"), list) and logprobs["content"]:  # chat shape
            top = {e["token"]: e["logprob"] for e in logprobs["content"][0].get("top_logprobs") or []}
        elif isinstance(logprobs.get("top_logprobs"), list) and logprobs["top_logprobs"]:  # completions shape
            top = dict(logprobs["top_logprobs"][0] or {})
        p = pair_probability(top) if top else None
        return p if p is not None else parse_answer(_choice_text(choice))

    def _one(self, item: tuple[Prompt, str, str, str]) -> tuple[float, str]:
        prompt, first, second, principle = item
        request = judge_request(prompt, first, second, principle, self.preamble, self.cot)
        rationale = ""
        if self.mode == "chat":
            messages = [{"role": "user", "content": request if self.cot else f"{request}\n\n{ENDING}"}]
            if self.cot:
                rationale = _choice_text(self._post(messages, self.cot_tokens, score=False)).strip()
                messages += [{"role": "assistant", "content": rationale}, {"role": "user", "content": COT_FOLLOW_UP}]
            return self._probability(self._post(messages, 8, score=True)), rationale
        if self.cot:
            rationale = _choice_text(self._post(self._text(request, ""), self.cot_tokens, score=False)).strip()
        text = self._text(request, (f"{rationale}\n" if self.cot else "") + ENDING + self.sep)
        return self._probability(self._post(text, 8, score=True)), rationale

    def score_shown(self, items):
        if len(items) == 1:
            return [self._one(items[0])]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:  # the client caps requests in flight
            return list(pool.map(self._one, items))


def _choice_text(choice: dict) -> str:
    if isinstance(choice.get("message"), dict):
        return choice["message"].get("content") or ""
    return choice.get("text") or ""


# ------------------------------------------------------------------------------------ any labeller plugs in


class RewardModelJudge(Judge):
    """Any alignkit reward source as a judge (a reward-model directory, ``vader``, ``module:function``, ...):
    P(first preferred) = σ((r_first − r_second) / scale), the Bradley–Terry model. Position-free by construction;
    the principle is ignored."""

    def __init__(self, reward: Any, principle: str = DEFAULT_PRINCIPLE, cache: JudgeCache | None = None,
                 batch_size: int = 64, scale: float = 1.0, name: str | None = None):
        super().__init__(principle, cache, batch_size)
        if isinstance(reward, str):
            from alignkit.rewards import load_reward

            name = name or f"reward:{reward}"
            reward = load_reward(reward)
        self.reward, self.scale = reward, scale
        self.name = name or f"reward:{getattr(reward, 'name', type(reward).__name__)}"
        self.template = f"bradley-terry/{scale}"

    def score_shown(self, items):
        prompts = [p for p, *_ in items] * 2
        texts = [a for _, a, _, _ in items] + [b for _, _, b, _ in items]
        r = self.reward(prompts, texts).float()  # (2n,): firsts, then seconds
        n = len(items)
        return [(p, "") for p in torch.sigmoid((r[:n] - r[n:]) / self.scale).tolist()]


class FunctionJudge(Judge):
    """A Python function as the judge: ``fn(prompt, first, second) -> P(first preferred)`` in [0, 1] (with a
    fourth parameter ``principle`` if it takes one). For custom labellers and for planting a position bias in
    tests."""

    def __init__(self, fn: Callable[..., float], principle: str = DEFAULT_PRINCIPLE, cache: JudgeCache | None = None,
                 batch_size: int = 1, name: str | None = None):
        super().__init__(principle, cache, batch_size)
        self.fn = fn
        self.with_principle = len(inspect.signature(fn).parameters) >= 4
        self.name = name or f"function:{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', 'fn')}"

    def score_shown(self, items):
        out = []
        for prompt, first, second, principle in items:
            p = self.fn(prompt, first, second, principle) if self.with_principle else self.fn(prompt, first, second)
            if isinstance(p, bool) or not isinstance(p, (int, float)):
                raise ValueError(f"judge function {self.name} returned {p!r}, expected a probability in [0, 1]")
            out.append((float(p), ""))
        return out


class EnsembleJudge:
    """One judge under several principles, probabilities averaged (Constitutional AI's RL-stage labels, Bai et al.
    2022 sec. 4.1: "ensembling over principles led to notably more robust PM behavior")."""

    def __init__(self, judge: Judge, principles: Sequence[str]):
        if not principles:
            raise ValueError("an ensemble needs at least one principle")
        self.judge, self.principles = judge, list(principles)
        self.name = f"ensemble({judge.name})"

    def compare(self, prompts, responses_a, responses_b, principle=None, progress=None) -> list[Verdict]:
        runs = [self.judge.compare(prompts, responses_a, responses_b, p, progress) for p in self.principles]
        verdicts = []
        for per_principle in zip(*runs, strict=True):
            p_ab = sum(v.p_ab for v in per_principle) / len(per_principle)
            p_ba = sum(v.p_ba for v in per_principle) / len(per_principle)
            verdicts.append(Verdict((p_ab + p_ba) / 2, p_ab, p_ba, (p_ab > 0.5) == (p_ba > 0.5), self.name,
                                    " | ".join(self.principles), per_principle[0].rationale,
                                    per_principle[0].rationale_ba))
        return verdicts


# ----------------------------------------------------------------------------------------------- spec parser

SPECS = """\
  local[:MODEL]          a causal LM judge (default smollm2-135m; hub id, directory or alignkit run dir)
  http(s)://HOST/v1|MODEL an OpenAI-compatible endpoint and its model name
  reward:SPEC            any reward source (vader, an RM directory, ...): P = sigmoid(r_first - r_second)
  module:function        fn(prompt, first, second) -> P(first preferred)"""


def load_judge(spec: str, principle: str = DEFAULT_PRINCIPLE, cache: JudgeCache | None = None, batch_size: int = 16,
               cot: bool = False, cot_tokens: int = 64, preamble: str = PREAMBLE, **http: Any) -> Judge:
    """Resolve a judge spec (one of ``SPECS``); ``preamble``, ``cot`` and ``http`` apply to LM judges only."""
    if spec == "local" or spec.startswith("local:"):
        model = spec.partition(":")[2] or "smollm2-135m"
        try:
            return LocalLMJudge(model, principle=principle, cache=cache, batch_size=batch_size, cot=cot,
                                cot_tokens=cot_tokens, preamble=preamble)
        except OSError as error:  # no such directory, hub id or weights (nothing is fetched at run time)
            raise DataError(f"--judge {spec}: cannot load the judge model {model!r} "
                            f"({str(error).splitlines()[0][:200]})") from None
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("|")
        return HTTPJudge(url, model or None, principle=principle, cache=cache, batch_size=batch_size, cot=cot,
                         cot_tokens=cot_tokens, preamble=preamble, **http)
    if spec.startswith("reward:") and spec[len("reward:") :]:
        return RewardModelJudge(spec[len("reward:") :], principle=principle, cache=cache, batch_size=batch_size)
    kind, _, attr = spec.partition(":")
    if attr and kind.replace(".", "").replace("_", "").isalnum():
        try:
            obj: Any = importlib.import_module(kind)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as error:
            raise DataError(f"--judge {spec}: cannot import {attr!r} from {kind!r} ({error})") from None
        if isinstance(obj, Judge):
            return obj
        if not callable(obj):
            raise DataError(f"--judge {spec}: {attr!r} is not callable")
        # one call per cache write: a killed job loses at most the call in flight
        return FunctionJudge(obj, principle=principle, cache=cache, batch_size=1, name=f"function:{spec}")
    raise DataError(f"--judge: unknown judge {spec!r}; expected one of:\n{SPECS}")
