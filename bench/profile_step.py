"""Profile one steady-state training step of DPO or the reward model on SmolLM2-135M (torch.profiler), in both
layouts: right-padded (``--no-packing``) and padding-free (the default). Prints the top operators by self CPU time.

    .venv/bin/python bench/profile_step.py [--algo dpo|rm] [--model smollm2-135m] [--top 12]

The batch is the first micro-batch (8 pairs) of the benchmark's workload (bench_dpo.py / bench_rm.py); one warm-up
step runs before the profiled one, AdamW included, as in the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", default="dpo", choices=["dpo", "rm"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--layout", default="both", choices=["both", "padded", "packed"])
    parser.add_argument("--shapes", action="store_true", help="group the table by input shapes as well")
    parser.add_argument("--stacks", metavar="OP", help="also print where OP (e.g. aten::fill_) is called from")
    args = parser.parse_args()
    from alignkit.data import preference_example, read_examples

    work = Path(tempfile.mkdtemp(prefix="profile-"))
    data = work / "pairs.jsonl"
    if args.algo == "dpo":
        import bench_dpo

        from alignkit.algos import dpo
        from alignkit.logprobs import LogprobModel
        from alignkit.models import load_model

        model, tokenizer = load_model(args.model)
        data.write_text("".join(json.dumps(r) + "\n" for r in bench_dpo.make_pairs(8)))
        items = [(e, 0.0, 0.0) for e in read_examples(str(data), preference_example, tokenizer, 128)]
        module, objective = LogprobModel(model), dpo.make_objective(dpo.DPOConfig())

        def loss(pack: bool):
            batch = dpo.collate_pairs(items, tokenizer.pad_token_id, pack)
            logps, lengths = dpo.pair_logps(module, batch)
            return objective(dpo._split(logps, lengths, batch))[0].sum()
    else:
        import bench_rm

        from alignkit.algos import rm

        data.write_text("".join(json.dumps(r) + "\n" for r in bench_rm.make_pairs(8, bench_rm.MAX_LENGTH)))
        model, tokenizer = rm.load_reward_model(args.model)
        examples = read_examples(str(data), rm.rm_example, tokenizer, bench_rm.MAX_LENGTH)
        module = rm.ScoreModel(model)

        def loss(pack: bool):
            return rm.pairwise_loss(module, rm.collate_pairs(examples, tokenizer.pad_token_id, pack))[0]

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)  # as the trainer's

    def step(pack: bool) -> None:
        loss(pack).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for pack in {"both": (False, True), "padded": (False,), "packed": (True,)}[args.layout]:
        step(pack)  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes, with_stack=bool(args.stacks)) as prof:
            step(pack)
        print(f"\n== {args.algo}, {'padding-free' if pack else 'padded (--no-packing)'}: step "
              f"{time.perf_counter() - start:.2f} s under the profiler")
        print(prof.key_averages(group_by_input_shape=args.shapes).table(
            sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40, max_shapes_column_width=60))
        if args.stacks:
            rows = [e for e in prof.key_averages(group_by_stack_n=6) if e.key == args.stacks]
            for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:8]:
                print(f"{e.self_cpu_time_total / 1e3:9.1f} ms {e.count:5d} calls  " + " <- ".join(e.stack[:6]))


if __name__ == "__main__":
    main()
