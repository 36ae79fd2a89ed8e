"""DPO micro-batch layouts side by side: one forward + backward of the policy (LM head included) on the same 8 pairs
of bench_dpo.py's workload, right-padded vs packed (each answer with its own prompt copy) vs packed with the prompt
shared by chosen and rejected (alignkit's default). Interleaved repetitions, best of ``--reps``; CPU seconds of
this process (1 thread recommended: steadier than wall time on a shared machine).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layouts.py [--model smollm2-135m] [--reps 3] [--layers N]

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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
