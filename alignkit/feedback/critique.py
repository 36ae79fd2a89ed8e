"""``alignkit critique``: Constitutional AI, supervised stage (Bai et al. 2022, https://arxiv.org/abs/2212.08073,
sec. 3.1).

For every prompt: an initial response (the data's ``completion``/``response``, or the last assistant turn of a
``messages`` record, else sampled from the model), then ``rounds`` times, with a principle drawn at random per
round from the constitution:

    ... user: <critique request>  -> assistant: <critique>
        user: <revision request>  -> assistant: <revision>   (the revision becomes the response)

all in one growing conversation, as in the paper (which used 4 rounds; 1-2 keep a CPU run short). Generation runs
through the rollout sampler in batches (the model's chat template; plain "User:/Assistant:" text without one), or
through an OpenAI-compatible endpoint with ``--generator http://HOST/v1|MODEL`` (or ``--endpoint``), or a colocated
vLLM engine holding the model's weights with ``--generator vllm``.

Output (``--output-dir``):
- ``sft.jsonl``: {prompt, completion = the final revision} (SFT data; message lists when the prompt is a
  conversation, i.e. whenever the model has a chat template or an endpoint generates);
- ``pairs.jsonl``: {prompt, chosen = final revision, rejected = initial response}, rows where they differ;
- ``chains.jsonl``: the whole chain per prompt: initial response, then per round the principle, critique request,
  critique, revision request and revision;
- ``summary.json``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import DataConfig, ModelConfig, arg, checked
from alignkit.data import DataError, load_records, split_conversation
from alignkit.feedback.constitution import load_constitution
from alignkit.feedback.label import write_jsonl_atomic
from alignkit.generation import generator_arg, is_endpoint, make_sampler

Messages = list[dict[str, str]]


@dataclass
class CritiqueConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data="bundled:instructions_test"))
    constitution: str = arg("default", "principles: 'default' (bundled) or a YAML file")
    rounds: int = arg(1, "critique -> revision rounds per prompt (the paper: 4)")
    sample_initial: bool = arg(False, "sample the initial response even when the data has one")
    max_new_tokens: int = arg(96, "longest response, critique or revision in tokens")
    temperature: float = arg(0.7, "sampling temperature; 0 = greedy")
    top_p: float = arg(0.9, "nucleus sampling mass; 1.0 = off")
    batch_size: int = arg(16, "conversations sampled together")
    max_prompts: int = arg(0, "only the first N prompts; 0: all")
    endpoint: str = arg("", "generate through an OpenAI-compatible endpoint: http://HOST/v1|MODEL; empty: --model")
    generator: str = generator_arg()
    api_key_env: str = arg("ALIGNKIT_API_KEY", "endpoint: environment variable holding the API key")
    concurrency: int = arg(8, "endpoint: requests in flight")
    output_dir: str = arg("runs/critique", "sft.jsonl, pairs.jsonl, chains.jsonl and summary.json go here")
    seed: int = arg(0, "seed for principle draws and sampling")


@dataclass
class Item:
    prompt: Any  # as in the data: a string or messages
    conversation: Messages  # the prompt as messages, growing with every turn
    initial: str | None  # from the data, or None (to be sampled)
    where: str


def read_items(source: str, skip_invalid: bool = False) -> list[Item]:
    items, skipped = [], 0
    for record in load_records(source):
        data = record.data
        try:
            items.append(_item(data, record.where))
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    if skipped:
        print(f"alignkit: {source}: skipped {skipped} invalid records", file=sys.stderr)
    if not items:
        raise DataError(f"{source}: no prompts")
    return items


def _item(data: dict, where: str) -> Item:
    def text_of(name: str, value: Any) -> str:
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1].get("content")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {name!r}: expected non-empty text")
        return value

    if "messages" in data and "prompt" not in data:
        prompt, initial = split_conversation(data["messages"], where)
        return Item(prompt, [dict(m) for m in prompt], initial, where)
    if "prompt" not in data:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        conversation = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     for m in prompt):
        conversation = [dict(m) for m in prompt]
    else:
        raise DataError(f"{where}: field 'prompt': expected a string or a list of messages")
    initial = None
    for name in ("completion", "response"):
        if data.get(name) is not None:
            initial = text_of(name, data[name])
            break
    return Item(prompt, conversation, initial, where)


class LocalGenerator:
    """Batched sampling of the next assistant turn of many conversations with the rollout sampler."""

    def __init__(self, model, tokenizer, cfg: CritiqueConfig, sampler=None):
        from alignkit.rollout import SamplingConfig

        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        greedy = cfg.temperature <= 0
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0 if greedy else cfg.temperature,
                                       top_p=cfg.top_p, greedy=greedy)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def render(self, conversation: Messages) -> list[int]:
        if self.templated:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in conversation]
        return self.tokenizer("\n\n".join(turns) + "\n\nAssistant:")["input_ids"]

    def __call__(self, conversations: list[Messages]) -> list[str]:
        from alignkit.rollout import sample

        prompts = [self.render(c) for c in conversations]
        if self.sampler is not None:  # --generator vllm
            rollout = self.sampler(prompts, self.sampling, self.generator)
        else:
            rollout = sample(self.model, prompts, self.sampling, tokenizer=self.tokenizer, generator=self.generator)
        ids = rollout.response_ids.masked_fill(rollout.response_mask == 0, self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class HTTPGenerator:
    """The next assistant turn from an OpenAI-compatible chat endpoint (``alignkit.serve.client``: retries,
    back-off, ``concurrency`` requests in flight)."""

    def __init__(self, spec: str, cfg: CritiqueConfig):
        from alignkit.serve.client import Client

        url, _, model = spec.partition("|")
        self.client = Client(url, model or None, api_key_env=cfg.api_key_env, max_concurrency=cfg.concurrency)
        self.max_tokens, self.temperature, self.top_p = cfg.max_new_tokens, max(cfg.temperature, 0.0), cfg.top_p
        self.templated = True

    def __call__(self, conversations: list[Messages]) -> list[str]:
        results = self.client.chat(conversations, self.max_tokens, self.temperature, top_p=self.top_p)
        return [r.text.strip() for r in results]


def _say(conversations: list[Messages], role: str, texts: list[str]) -> None:
    for conversation, text in zip(conversations, texts, strict=True):
        conversation.append({"role": role, "content": text})


@checked
def critique(cfg: CritiqueConfig) -> Path:
    """Run the critique -> revision chains; write sft.jsonl, pairs.jsonl, chains.jsonl, summary.json."""
    if cfg.rounds < 1:
        raise DataError(f"--rounds must be at least 1, got {cfg.rounds}")
    if not cfg.data.data:
        raise DataError("critique needs --data: prompts (prompt, optional completion) or messages")
    principles = load_constitution(cfg.constitution)
    items = read_items(cfg.data.data, cfg.data.skip_invalid)
    if cfg.max_prompts:
        items = items[: cfg.max_prompts]
    if cfg.endpoint and cfg.generator != "builtin":
        raise DataError(f"--endpoint and --generator {cfg.generator}: give one of them")
    endpoint = cfg.endpoint or (cfg.generator if is_endpoint(cfg.generator) else "")
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise DataError(f"--endpoint: expected http(s)://HOST/v1|MODEL, got {endpoint!r}")
        generate: Any = HTTPGenerator(endpoint, cfg)
    else:
        from alignkit.engine import default_threads
        from alignkit.models import load_model

        default_threads()
        model, tokenizer = load_model(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
        model.requires_grad_(False)  # never trained: the sampler keeps its packed weights (rollout._decoder)
        # prompt (a growing conversation) + response: the model's whole context
        sampler = make_sampler(cfg.generator, model, tokenizer, getattr(model.config, "max_position_embeddings", 4096),
                               seed=cfg.seed, follow_updates=False)
        generate = LocalGenerator(model, tokenizer, cfg, sampler)
    from alignkit.serve.client import RequestError, ServerError

    try:
        chains = _chains(items, principles, generate, cfg)
    except (RequestError, ServerError) as error:
        raise DataError(f"--{'endpoint' if cfg.endpoint else 'generator'} {endpoint}: {error}") from None
    _write(chains, items, generate, cfg)
    return Path(cfg.output_dir)


def _chains(items: list[Item], principles: list, generate: Any, cfg: CritiqueConfig) -> list[dict]:
    rng = random.Random(cfg.seed)
    chains = []
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start : start + cfg.batch_size]
        conversations = [[dict(m) for m in item.conversation] for item in batch]
        need = [i for i, item in enumerate(batch) if item.initial is None or cfg.sample_initial]
        sampled = generate([conversations[i] for i in need]) if need else []
        initial = [item.initial for item in batch]
        for i, text in zip(need, sampled, strict=True):
            initial[i] = text
        _say(conversations, "assistant", [t or "" for t in initial])
        current = list(initial)
        rounds: list[list[dict]] = [[] for _ in batch]
        for _ in range(cfg.rounds):
            drawn = [rng.choice(principles) for _ in batch]  # a principle per prompt per round (CAI)
            _say(conversations, "user", [p.critique_request for p in drawn])
            critiques = generate(conversations)
            _say(conversations, "assistant", critiques)
            _say(conversations, "user", [p.revision_request for p in drawn])
            revisions = generate(conversations)
            _say(conversations, "assistant", revisions)
            for i, (p, c, r) in enumerate(zip(drawn, critiques, revisions, strict=True)):
                rounds[i].append({"principle": p.name, "critique_request": p.critique_request, "critique": c,
                                  "revision_request": p.revision_request, "revision": r})
                if r.strip():  # an empty revision keeps the previous response
                    current[i] = r
        for i, item in enumerate(batch):
            chains.append({"prompt": item.prompt, "where": item.where, "initial": initial[i], "rounds": rounds[i],
                           "final": current[i], "conversation": conversations[i]})
        print(f"critique: {min(start + cfg.batch_size, len(items))}/{len(items)} prompts", file=sys.stderr, flush=True)
    return chains


def _write(chains: list[dict], items: list[Item], generate: Any, cfg: CritiqueConfig) -> None:
    as_messages = generate.templated or any(not isinstance(item.prompt, str) for item in items)
    sft, pairs = [], []
    for chain, item in zip(chains, items, strict=True):
        final, first = chain["final"], chain["initial"]
        if not final or not final.strip():
            continue
        if as_messages:
            prompt = item.conversation
            completion: Any = [{"role": "assistant", "content": final}]
            rejected: Any = [{"role": "assistant", "content": first}]
        else:
            prompt, completion, rejected = item.prompt, " " + final, " " + (first or "")
        sft.append({"prompt": prompt, "completion": completion})
        if first and first.strip() and first.strip() != final.strip():
            pairs.append({"prompt": prompt, "chosen": completion, "rejected": rejected})
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_dir / "chains.jsonl", chains)
    write_jsonl_atomic(out_dir / "sft.jsonl", sft)
    write_jsonl_atomic(out_dir / "pairs.jsonl", pairs)
    summary = {"prompts": len(items), "rounds": cfg.rounds, "sft_rows": len(sft), "pairs": len(pairs),
               "revised": sum(c["final"] != c["initial"] for c in chains),
               "principles_used": sorted({r["principle"] for c in chains for r in c["rounds"]}),
               "mean_words_initial": sum(len((c["initial"] or "").split()) for c in chains) / len(chains),
               "mean_words_final": sum(len((c["final"] or "").split()) for c in chains) / len(chains)}
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    print(json.dumps(summary, indent=2))
    print(f"wrote {len(sft)} SFT rows, {len(pairs)} revision-over-original pairs and the chains to {out_dir}")
