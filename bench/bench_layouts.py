"""Micro-batch layouts side by side, same tokens, same model. Interleaved repetitions, best of ``--reps``; CPU
seconds of this process (1 thread recommended: steadier than wall time on a shared machine).

DPO (default): one forward + backward of the policy (LM head included) on the same 8 pairs of bench_dpo.py's
workload, right-padded vs packed (each answer with its own prompt copy) vs packed with the prompt shared by chosen
and rejected (alignkit's default).

``--rollout``: GRPO's log-prob passes on one rollout of bench_grpo.py's shape (16 movie-review prompts x 4
responses) sampled by the model itself with ``--max-new-tokens`` (responses end at EOS or the cap): the policy's
forward + backward and the reference's no-grad forward, padded rows (the prompt shared through a KV cache) vs
padding-free rows (``--packing``, the default).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layouts.py [--model smollm2-135m] [--reps 3] [--layers N]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layouts.py --rollout [--max-new-tokens 128] [--cut]

``--layers`` keeps only the first N blocks (same shapes per block, a quicker measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--rollout", action="store_true", help="GRPO's rollout layouts instead of DPO's")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cut", action="store_true",
                        help="with --rollout: cut each sampled response at a length drawn uniformly from 1..its own")
    args = parser.parse_args()
    if args.rollout:
        return rollout_layouts(args)
    import bench_dpo

    from alignkit.algos import dpo
    from alignkit.data import preference_example, read_examples
    from alignkit.data.collate import pack_prompt_groups
    from alignkit.logprobs import LogprobModel
    from alignkit.models import load_model

    model, tokenizer = load_model(args.model)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bench_dpo.make_pairs(8)))
    items = [(e, 0.0, 0.0) for e in read_examples(str(data), preference_example, tokenizer, 128)]
    pad = tokenizer.pad_token_id

    def unshared():
        batch = pack_prompt_groups([(e.prompt_ids, [e.chosen_ids, e.rejected_ids]) for e, _, _ in items], pad,
                                   share_prompt=False)
        b = len(items)
        batch["response_index"] = (batch["response_index"] % 2) * b + batch["response_index"] // 2
        batch["lengths"] = batch["lengths"].view(b, 2).t().reshape(-1)
        return batch

    layouts = {"padded": dpo.collate_pairs(items, pad), "packed": unshared(),
               "packed, prompt shared": dpo.collate_pairs(items, pad, pack=True)}
    module = LogprobModel(model)
    best: dict[str, float] = {}
    sums: dict[str, torch.Tensor] = {}
    for _ in range(args.reps):
        for name, batch in layouts.items():
            start = time.process_time()
            logps, _ = dpo.pair_logps(module, batch)
            logps.sum().backward()
            best[name] = min(best.get(name, float("inf")), time.process_time() - start)
            model.zero_grad(set_to_none=True)
            sums[name] = logps.detach()
    print(f"{args.model}{f' ({args.layers} blocks)' if args.layers else ''}, 8 pairs, torch threads "
          f"{torch.get_num_threads()}; forward + backward, best of {args.reps}, CPU s")
    for name, batch in layouts.items():
        positions = batch["input_ids"].numel()
        diff = (sums[name] - sums["padded"]).abs().max().item()
        print(f"  {name:<22} rows {tuple(batch['input_ids'].shape)!s:<10} positions {positions:5d}  "
              f"{best[name]:6.2f} s  ({best['padded'] / best[name]:.2f}x padded)  max |Δ log p| vs padded {diff:.1e}")


def rollout_layouts(args: argparse.Namespace) -> None:
    import bench_grpo

    from alignkit.logprobs import LogprobModel
    from alignkit.models import load_model
    from alignkit.online import packed_rollout, prompt_batch, read_prompts, response_logprobs, rollout_groups
    from alignkit.rollout import SamplingConfig, sample

    model, tokenizer = load_model(args.model)
    prompts = read_prompts(str(bench_grpo.PROMPTS), tokenizer, bench_grpo.MAX_LENGTH)
    drawn = prompt_batch(prompts, 0, bench_grpo.PROMPTS_PER_STEP, 0)
    rows = [p.prompt_ids for p in drawn for _ in range(bench_grpo.GROUP)]
    rollout = sample(model, rows, SamplingConfig(max_new_tokens=args.max_new_tokens), tokenizer=tokenizer,
                     generator=torch.Generator().manual_seed(0))
    if args.cut:  # responses that end anywhere (a chat or reasoning task's spread), same tokens up to the cut
        g = torch.Generator().manual_seed(1)
        keep = (torch.rand(len(rows), generator=g) * rollout.response_mask.sum(-1)).long() + 1
        rollout.response_mask = (torch.arange(rollout.response_mask.shape[1]) < keep[:, None]).long()
        rollout.response_ids = rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    if args.layers:  # after sampling, so the responses are the whole model's
        model.model.layers = model.model.layers[: args.layers]
    lengths = rollout.response_mask.sum(-1)
    real = sum(len(p) for p, _ in rollout_groups(rollout)) + int(lengths.sum())
    chosen = packed_rollout(rollout, model.config)
    module = LogprobModel(model)
    best: dict[tuple[str, bool], float] = {}
    out: dict[bool, torch.Tensor] = {}
    for _ in range(args.reps):
        for packing in (False, True):
            start = time.process_time()
            logps = response_logprobs(module, rollout, packing=packing)
            logps.sum().backward()
            best["update", packing] = min(best.get(("update", packing), float("inf")), time.process_time() - start)
            model.zero_grad(set_to_none=True)
            out[packing] = logps.detach()
            start = time.process_time()
            with torch.no_grad():
                response_logprobs(module, rollout, packing=packing)
            best["reference", packing] = min(best.get(("reference", packing), float("inf")),
                                             time.process_time() - start)
    padded = rollout.prompt_ids.shape[1] * len(rollout_groups(rollout)) + lengths.numel() * int(lengths.max())
    print(f"{args.model}{f' ({args.layers} blocks)' if args.layers else ''}, {len(rows)} responses of up to "
          f"{args.max_new_tokens} tokens (mean {lengths.float().mean():.1f}, {int(lengths.sum())} tokens; prompts and "
          f"responses {real} tokens, padded layout {padded} positions), torch threads {torch.get_num_threads()}; "
          f"best of {args.reps}, CPU s")
    for part in ("update", "reference"):
        print(f"  {part + (' (forward + backward)' if part == 'update' else ' (no-grad forward)'):<32} padded "
              f"{best[part, False]:6.2f} s   --packing {best[part, True]:6.2f} s   "
              f"{best[part, False] / best[part, True]:.2f}x")
    print("  --packing chose " + ("the padded rows (estimated cheaper)" if chosen is None else
                                  f"padding-free rows {tuple(chosen['input_ids'].shape)}") +
          f"; max |Δ log p| vs padded {(out[True] - out[False]).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
