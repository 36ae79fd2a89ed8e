"""The speed targets in one command: every SmolLM2 bench alone, one after another, then one table of targets.

    .venv/bin/python bench/targets.py [--threads 2] [--repeat 2] [--skip vllm,rm] [--log FILE]
    .venv/bin/python bench/targets.py --from RECORDS.jsonl      (the table again, from an earlier run's records)
    (make bench-targets)

Runs bench_dpo, bench_rm, bench_grpo (--skip-ppo), bench_sft, bench_kto, bench_rollout and, where `make .venv-vllm` has built it,
bench_vllm in that environment, each as its own process with its output shown as it comes. Each bench appends its
figures to a records file (``flops.record``, JSON lines; kept beside the log). The table then sets each figure
against its target, for this machine's kind:

- CPU with native bf16 (AVX512-BF16/AMX; the benches then run alignkit and its peers in bf16): DPO end to end
  >= 3x TRL and its steady step <= 1.5x the FLOP bound; RM >= 2x TRL; GRPO step >= 3x TRL; sampling >= 2x HF
  generate at batch 64 and >= 1.5x at batch 8, and at least vLLM's CPU build on every workload.
- AVX2-only CPU (fp32): every steady step <= 1.3x its FLOP bound (SFT's and KTO's too), and the same ratios to
  the peers. SFT and KTO have no peer targets: their ratios to TRL are printed as "(no target)".

"bound allows" is the largest ratio to the peer that the FLOP bound leaves possible (the peer's time over the
bound's): where it is below the target, the target is ruled out on this machine whatever the code does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHES = {  # name -> arguments after the script (the --threads / --repeat flags are added where taken)
    "dpo": ["bench_dpo.py", "--models", "smollm2"],
    "rm": ["bench_rm.py", "--models", "smollm2"],
    "grpo": ["bench_grpo.py", "--models", "smollm2", "--steps", "3", "--skip-ppo"],
    "sft": ["bench_sft.py", "--models", "smollm2"],
    "kto": ["bench_kto.py", "--models", "smollm2"],
    "rollout": ["bench_rollout.py", "--models", "smollm2"],
    "vllm": ["bench_vllm.py"],
}
REPEATS = ("dpo", "rm", "grpo", "sft", "kto")  # training benches: --repeat alternates the arms and keeps each one's fastest
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def run_benches(names: list[str], records: Path, log: Path, threads: int, repeat: int,
                vllm_python: Path = VLLM_PYTHON) -> None:
    env = {**os.environ, "ALIGNKIT_BENCH_RECORD": str(records), "PYTHONPATH": str(ROOT)}
    with log.open("a") as out:
        for name in names:
            python = sys.executable
            if name == "vllm":
                if not vllm_python.exists():
                    print(f"[targets] vllm: skipped, {vllm_python} not found (make .venv-vllm)", flush=True)
                    continue
                python = str(vllm_python)
            command = [python, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]]
            if threads:
                command += ["--threads", str(threads)] if name != "vllm" else []
            if repeat > 1 and name in REPEATS:
                command += ["--repeat", str(repeat)]
            thread_env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
            header = f"[targets] {time.strftime('%H:%M:%S')} {' '.join(command[1:])}"
            print(header, flush=True)
            out.write(header + "\n")
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**env, **thread_env}, cwd=ROOT) as proc:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    out.write(line)
                    out.flush()
            if proc.returncode:
                print(f"[targets] {name} exited with status {proc.returncode}; its figures may be missing", flush=True)


def read_records(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"targets: error: {path}:{number}: not a JSON line ({e.msg})") from None
    return rows


def targets(records: list[dict]) -> list[dict]:
    """One row per target: {target, measured, goal, allows, verdict}; ratios are "x", higher is better for peer
    ratios (peer time / alignkit time) and lower for time over bound. The newest record of each kind counts."""
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r["bench"], r.get("precision"), r.get("workload"))] = r
    native = any(r.get("native_bf16") for r in records)
    precision = "bf16" if native else "fp32"
    rows: list[dict] = []

    def peer(target: str, ours: float, theirs: float, goal: float | None, bound: float | None) -> None:
        rows.append(_row(target, theirs / ours, goal, theirs / bound if bound else None, higher=True))

    def step(target: str, seconds: float, bound: float, goal: float | None) -> None:
        rows.append(_row(target, seconds / bound, goal, None, higher=False))

    dpo = latest.get(("dpo", precision, None))
    if dpo and "trl_e2e" in dpo:
        peer("DPO end to end vs TRL", dpo["alignkit_e2e"], dpo["trl_e2e"], 3.0, dpo["bound_epoch"])
        peer("DPO steady step vs TRL", dpo["alignkit_step"], dpo["trl_step"], None, dpo["bound_step"])
    if dpo:
        step("DPO steady step / FLOP bound", dpo["alignkit_step"], dpo["bound_step"], 1.5 if native else 1.3)
    rm = latest.get(("rm", precision, None))
    if rm and "trl_e2e" in rm:
        peer("RM end to end vs TRL", rm["alignkit_e2e"], rm["trl_e2e"], 2.0, rm["bound_epoch"])
    if rm:
        step("RM steady step / FLOP bound", rm["alignkit_step"], rm["bound_step"], None if native else 1.3)
    grpo = latest.get(("grpo", precision, None))
    if grpo and "trl_step" in grpo:
        peer("GRPO step vs TRL", grpo["alignkit_step"], grpo["trl_step"], 3.0, grpo["alignkit_bound_step"])
    if grpo:
        step("GRPO step / FLOP bound", grpo["alignkit_step"], grpo["alignkit_bound_step"], None if native else 1.3)
    for bench in ("sft", "kto"):
        r = latest.get((bench, precision, None))
        if r and "trl_e2e" in r:
            peer(f"{bench.upper()} end to end vs TRL", r["alignkit_e2e"], r["trl_e2e"], None, r["bound_epoch"])
        if r:
            step(f"{bench.upper()} steady step / FLOP bound", r["alignkit_step"], r["bound_step"], None if native else 1.3)
    for workload, goal in (("b64x32", 2.0), ("b8x48", 1.5), ("grpo", None)):
        r = latest.get(("rollout", None, workload))
        ours = f"alignkit {precision}"
        if r and ours in r["tokens_per_s"]:
            speeds = r["tokens_per_s"]
            hf = max((k for k in speeds if k.startswith("HF")), key=speeds.get)
            # at its bound alignkit would make tokens / bound tokens/s
            rows.append(_row(f"sampling {workload} vs {hf}", speeds[ours] / speeds[hf], goal,
                             r["tokens"] / r["bound"][ours] / speeds[hf], higher=True))
        v = latest.get(("vllm", None, workload))
        if v:
            speeds = v["tokens_per_s"]
            ours = next(k for k in speeds if k.startswith("alignkit"))
            theirs = next(k for k in speeds if k.startswith("vLLM"))
            rows.append(_row(f"sampling {workload} vs {theirs}", speeds[ours] / speeds[theirs], 1.0, None, higher=True))
    return rows


def _row(target: str, measured: float, goal: float | None, allows: float | None, higher: bool) -> dict:
    if goal is None:
        verdict = "(no target)"
    elif (measured >= goal) if higher else (measured <= goal):
        verdict = "met"
    elif higher and allows is not None and allows < goal:
        verdict = "not met; ruled out by the bound"
    else:
        verdict = "NOT MET"
    return {"target": target, "measured": measured, "goal": goal, "allows": allows if higher else None,
            "verdict": verdict, "higher": higher}


def print_table(records: list[dict]) -> None:
    native = any(r.get("native_bf16") for r in records)
    cpus = sorted({r.get("cpu", "") for r in records})
    print(f"\nTargets for a CPU {'with native bf16 (bf16 runs)' if native else 'without native bf16 (fp32 runs)'}; "
          f"CPU: {', '.join(cpus) or 'unknown'}; torch threads {sorted({r.get('threads') for r in records})}")
    print(f"{'target':<44} {'measured':>9} {'goal':>8} {'bound allows':>13}  verdict")
    for row in targets(records):
        sign = ">=" if row["higher"] else "<="
        goal = f"{sign} {row['goal']:.1f}x" if row["goal"] is not None else "-"
        allows = f"{row['allows']:.2f}x" if row["allows"] is not None else "-"
        print(f"{row['target']:<44} {row['measured']:8.2f}x {goal:>8} {allows:>13}  {row['verdict']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per bench (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the training benches (fastest kept)")
    parser.add_argument("--skip", default="", help=f"comma-separated benches to leave out, of {', '.join(BENCHES)}")
    parser.add_argument("--log", default="", help="file for the benches' output (default: bench-targets-TIME.log)")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="the Python of vLLM's environment")
    parser.add_argument("--from", dest="records", default="", help="print the table from this records file only")
    args = parser.parse_args()
    if args.records:
        if not Path(args.records).is_file():
            parser.error(f"--from: {args.records} is not a file")
        return print_table(read_records(Path(args.records)))
    skip = [s for s in args.skip.split(",") if s]
    unknown = [s for s in skip if s not in BENCHES]
    if unknown:
        parser.error(f"--skip: unknown bench {unknown[0]!r}; expected some of {', '.join(BENCHES)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = Path(args.log or f"bench-targets-{stamp}.log").resolve()
    records = log.with_suffix(".records.jsonl")
    run_benches([b for b in BENCHES if b not in skip], records, log, args.threads, args.repeat, Path(args.vllm_python))
    if not records.exists():
        sys.exit("targets: error: no bench wrote a figure; see the output above")
    print_table(read_records(records))
    print(f"\nbench output: {log}; figures: {records} (python bench/targets.py --from {records})")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
