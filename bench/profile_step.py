"""Profile one steady-state training step of DPO or the reward model on SmolLM2-135M (torch.profiler), in both
layouts: right-padded (``--no-packing``) and padding-free (the default). Prints the top operators by self CPU time.

    .venv/bin/python bench/profile_step.py [--algo dpo|rm] [--model smollm2-135m] [--top 12]

The batch is the first micro-batch (8 pairs) of the benchmark's workload (bench_dpo.py / bench_rm.py); two warm-up
steps run before the profiled one, AdamW included, as in the trainer (the second still page-faults ~260k pages in
while the heap settles, see engine.keep_freed_memory; from the third on a step faults none).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
LAYOUTS = {"both": (False, True), "padded": (False,), "packed": (True,)}  # --layout -> packing on/off


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", default="dpo", choices=["dpo", "rm"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--layout", default="both", choices=["both", "padded", "packed"])
    parser.add_argument("--shapes", action="store_true", help="group the table by input shapes as well")
    parser.add_argument("--stacks", metavar="OP", help="also print where OP (e.g. aten::fill_) is called from")
    parser.add_argument("--malloc-default", action="store_true", help="leave glibc's malloc as it is (A/B)")
    parser.add_argument("--floor", action="store_true",
                        help="instead of the profile: the step against the matmul floor and the FLOP bound")
    args = parser.parse_args()
    from alignkit.data import preference_example, read_examples
    from alignkit.engine import keep_freed_memory

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

    if not args.malloc_default:
        keep_freed_memory()  # as the trainer (Engine) does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)  # as the trainer's

    def step(pack: bool) -> None:
        loss(pack).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if args.floor:
        return floor(step, args.layout)
    for pack in LAYOUTS[args.layout]:
        for _ in range(2):  # warm-up: the second step still page-faults ~260k pages in as the heap settles
            step(pack)
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


def floor(step, layout: str) -> None:
    """Median of 3 unprofiled steps against (a) the matmul floor: this step's matrix multiplies replayed alone at
    their own shapes (flops.matmul_floor), and (b) the FLOP bound: the same matmul FLOPs at the 1024-square rate."""
    import statistics

    from flops import machine_rates, matmul_floor

    rate = machine_rates()["no"] * 1e9
    for pack in LAYOUTS[layout]:
        step(pack)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step(pack)
            times.append(time.perf_counter() - start)
        seconds, flops, calls = matmul_floor(functools.partial(step, pack))
        median, bound = statistics.median(times), flops / rate
        print(f"{'padding-free' if pack else 'padded'}: step {median:.2f} s; {calls} matmuls, {flops / 1e9:.0f} GFLOP: "
              f"FLOP bound {bound:.2f} s, matmul floor {seconds:.2f} s ({flops / seconds / 1e9:.0f} GFLOP/s, "
              f"{seconds / bound:.2f}x the bound); step = {median / seconds:.2f}x the floor, {median / bound:.2f}x "
              f"the bound", flush=True)


if __name__ == "__main__":
    main()
