"""bench/targets.py: the records the benches write (bench/flops.record) read back, and each target's verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_modules(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("ALIGNKIT_BENCH_RECORD", str(tmp_path / "records.jsonl"))
    monkeypatch.setenv("ALIGNKIT_BF16", "0")  # an AVX2-class machine: the fp32 targets
    import flops
    import targets

    return flops, targets, tmp_path / "records.jsonl"


def test_records_round_trip_into_the_targets_table(bench_modules):
    flops, targets, path = bench_modules
    # the fields each bench records (bench_dpo, bench_rm, bench_grpo, bench_rollout, bench_vllm), made-up figures
    flops.record("dpo", model="smollm2", precision="fp32", gflops=150.0, bound_step=2.0, bound_step_shared=1.6,
                 bound_epoch=24.0, alignkit_e2e=40.0, alignkit_step=2.5, trl_e2e=100.0, trl_step=8.0)
    flops.record("rm", model="smollm2", precision="fp32", gflops=150.0, bound_step=4.0, bound_epoch=32.0,
                 alignkit_e2e=50.0, alignkit_step=5.0, alignkit_train=40.0, trl_e2e=90.0, trl_step=10.0, trl_train=80.0)
    flops.record("grpo", model="smollm2", precision="fp32", gflops=150.0, alignkit_e2e=100.0, alignkit_step=30.0,
                 alignkit_rollout=8.0, alignkit_update=22.0, alignkit_bound_step=20.0, trl_e2e=200.0, trl_step=70.0,
                 trl_rollout=18.0, trl_update=52.0, trl_bound_step=21.0)
    flops.record("rollout", model="smollm2", workload="b64x32", tokens=2048, bound={"HF generate fp32": 8.0,
                 "alignkit fp32": 8.0}, tokens_per_s={"HF generate fp32": 64.0, "alignkit fp32": 160.0})
    flops.record("vllm", workload="b8x48", startup_s=16.0, tokens_per_s={"alignkit fp32": 80.0, "vLLM float32": 100.0})
    flops.record("sft", model="smollm2", precision="fp32", gflops=150.0, bound_step=4.0, bound_epoch=60.0,
                 alignkit_e2e=90.0, alignkit_step=6.0, trl_e2e=135.0, trl_step=8.0)
    flops.record("kto", model="smollm2", precision="fp32", gflops=150.0, bound_step=2.0, bound_epoch=40.0,
                 alignkit_e2e=60.0, alignkit_step=2.5, alignkit_padded_e2e=75.0, alignkit_padded_step=3.1,
                 trl_e2e=100.0, trl_step=6.0)

    records = targets.read_records(path)
    assert [r["bench"] for r in records] == ["dpo", "rm", "grpo", "rollout", "vllm", "sft", "kto"]
    assert records[0]["native_bf16"] is False and records[0]["threads"] >= 1
    rows = {r["target"]: r for r in targets.targets(records)}
    dpo = rows["DPO end to end vs TRL"]
    assert dpo["measured"] == pytest.approx(2.5) and dpo["allows"] == pytest.approx(100 / 24)
    assert dpo["verdict"] == "NOT MET"  # 2.5x < 3x, though the bound allows 4.2x
    assert rows["DPO steady step / FLOP bound"]["measured"] == pytest.approx(1.25)
    assert rows["DPO steady step / FLOP bound"]["verdict"] == "met"  # <= 1.3x on a CPU without native bf16
    assert rows["DPO steady step vs TRL"]["verdict"] == "(no target)"
    assert rows["RM end to end vs TRL"]["measured"] == pytest.approx(1.8)
    assert rows["RM steady step / FLOP bound"]["verdict"] == "met"  # 1.25x
    grpo = rows["GRPO step vs TRL"]
    assert grpo["allows"] == pytest.approx(3.5) and grpo["verdict"] == "NOT MET"
    assert rows["GRPO step / FLOP bound"]["verdict"] == "NOT MET"  # 1.5x > 1.3x
    sampling = rows["sampling b64x32 vs HF generate fp32"]
    assert sampling["measured"] == pytest.approx(2.5) and sampling["allows"] == pytest.approx(4.0)
    assert sampling["verdict"] == "met"
    assert rows["sampling b8x48 vs vLLM float32"]["verdict"] == "NOT MET"  # 0.8x
    assert rows["SFT steady step / FLOP bound"]["measured"] == pytest.approx(1.5)
    assert rows["SFT steady step / FLOP bound"]["verdict"] == "NOT MET"  # 1.5x > 1.3x
    assert rows["SFT end to end vs TRL"]["measured"] == pytest.approx(1.5)
    assert rows["SFT end to end vs TRL"]["verdict"] == "(no target)"
    assert rows["KTO steady step / FLOP bound"]["verdict"] == "met"  # 1.25x
    assert rows["KTO end to end vs TRL"]["allows"] == pytest.approx(2.5)


def test_a_target_the_bound_rules_out_says_so(bench_modules):
    flops, targets, path = bench_modules
    flops.record("grpo", model="smollm2", precision="fp32", gflops=150.0, alignkit_e2e=100.0, alignkit_step=30.0,
                 alignkit_rollout=8.0, alignkit_update=22.0, alignkit_bound_step=25.0, trl_e2e=200.0, trl_step=60.0,
                 trl_rollout=18.0, trl_update=42.0, trl_bound_step=25.0)
    row = next(r for r in targets.targets(targets.read_records(path)) if r["target"] == "GRPO step vs TRL")
    assert row["allows"] == pytest.approx(2.4) and row["verdict"] == "not met; ruled out by the bound"


def test_from_a_broken_records_file_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"bench": "dpo"}\nnot json\n')
    done = subprocess.run([sys.executable, str(BENCH / "targets.py"), "--from", str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"targets: error: {path}:2: not a JSON line (Expecting value)"]
