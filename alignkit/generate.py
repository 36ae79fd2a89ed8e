"""``alignkit generate``: sample completions from any model or checkpoint (batched, KV cache)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from alignkit.config import OptionError, at_least, between, model_location
from alignkit.data.examples import encode_prompt
from alignkit.data.records import DataError
from alignkit.models import load_model


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, hub id, path or alignkit run dir")
    parser.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    parser.add_argument("--prompts-file", help="JSONL with a 'prompt' field (string or messages)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 where it is fast")
    parser.add_argument("--seed", type=int, default=0)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, batch_size: int = 16) -> list[str]:
    """Completions (text) for prompts given as strings (used raw) or message lists (chat template applied)."""
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        length = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(ids)) + ids for ids in chunk])
        attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in chunk])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, **sampling)
        outputs += tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
    return outputs


def check_flags(args: argparse.Namespace) -> None:
    """Every flag, before the model is loaded (one-line ``OptionError``s)."""
    checks = {"model": model_location, "max_new_tokens": at_least(1), "batch_size": at_least(1),
              "temperature": at_least(0), "top_p": between(0, 1)}
    for name, check in checks.items():
        problem = check(getattr(args, name))
        if problem:
            raise OptionError(name, getattr(args, name), problem)
    if args.top_p == 0:
        raise OptionError("top_p", args.top_p, "expected a value in (0, 1]")


def generate_cli(args: argparse.Namespace) -> None:
    check_flags(args)
    prompts: list = [p if args.raw else [{"role": "user", "content": p}] for p in args.prompt]
    if args.prompts_file:
        from alignkit.data import load_records

        for record in load_records(args.prompts_file):
            prompt = record.data.get("prompt")
            if not prompt or not isinstance(prompt, (str, list)):
                raise DataError(f"{record.where}: field 'prompt': expected a non-empty string or list of messages")
            prompts.append(prompt)
    if not prompts:
        raise SystemExit("alignkit: error: give --prompt TEXT or --prompts-file FILE")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
    sys.stdout.flush()
