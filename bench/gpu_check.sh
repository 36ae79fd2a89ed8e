#!/usr/bin/env bash
# One short check for a CUDA machine, run as is from a checkout:   bash bench/gpu_check.sh [MODEL]
#
# Trains sft, rm, dpo, grpo and ppo for a few steps each on SmolLM2-135M-Instruct (or MODEL) and prints one table:
# step time, training tokens/s, peak GPU memory and the final loss, all read from each run's metrics.jsonl.
# With 1 GPU every command runs once in a single process. With N > 1 GPUs each runs under DDP (all GPUs), sft and
# all of them also under FSDP2, and under DeepSpeed ZeRO-2 when `import deepspeed` works; with 1 GPU and
# `import vllm` working (e.g. PYTHON=.venv-vllm/bin/python), grpo and ppo once more with --generator vllm; the accelerate files are examples/accelerate/*.yaml. About 1-2 minutes per layout on one recent GPU.
# Without a GPU it says so and exits 0 at once.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), STEPS (default 6), OUT (default
# runs/gpu_check). Step time and tokens/s leave out the first step (CUDA start-up); the online trainers' step time
# includes sampling, their tokens are those of the training forwards. GPU_CHECK_ON_CPU=N runs the same on N CPU
# processes (gloo) to check the script itself, e.g. GPU_CHECK_ON_CPU=1 STEPS=3 with a tiny random MODEL directory.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
MODEL=${1:-smollm2-135m}
STEPS=${STEPS:-6}
OUT=${OUT:-runs/gpu_check}

if [[ -n "${GPU_CHECK_ON_CPU:-}" ]]; then
  # a dry run of this script itself on N CPU processes (gloo), e.g. GPU_CHECK_ON_CPU=2 STEPS=2 with a tiny MODEL
  GPUS=$GPU_CHECK_ON_CPU
# first without importing torch (seconds on a busy CPU box): the driver's tool and CUDA_VISIBLE_DEVICES
elif ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L 2> /dev/null | grep -q "^GPU" \
   || [[ "${CUDA_VISIBLE_DEVICES-unset}" == "" || "${CUDA_VISIBLE_DEVICES-unset}" == "-1" ]]; then
  echo "gpu_check: no CUDA GPU on this machine (no nvidia-smi, no GPU listed, or CUDA_VISIBLE_DEVICES empty); nothing to measure."
  exit 0
else
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
  if [[ "$GPUS" == "0" ]]; then
    echo "gpu_check: no CUDA GPU visible to torch $("$PYTHON" -c 'import torch; print(torch.__version__)') (a CPU build?); nothing to measure."
    exit 0
  fi
  "$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
fi
mkdir -p "$OUT"

# preference pairs for rm and dpo from the bundled instructions: the reference answer over another prompt's answer
PAIRS="$OUT/pairs.jsonl"
"$PYTHON" - "$PAIRS" <<'EOF'
import json, sys
from alignkit.data import load_records
rows = [r.data for r in load_records("bundled:instructions_train")]
with open(sys.argv[1], "w") as f:
    for i, row in enumerate(rows):
        msgs, other = row["messages"], rows[(i + 7) % len(rows)]["messages"]
        f.write(json.dumps({"prompt": msgs[0]["content"], "chosen": msgs[-1]["content"], "rejected": other[-1]["content"]}) + "\n")
EOF

COMMON=(--model "$MODEL" --max-steps "$STEPS" --no-progress --report-to none --save-steps 0 --seed 0)
ONLINE=(--data bundled:movie_prompts_train --reward vader --max-new-tokens 48 --prompts-per-step 16 --group-size 4
        --batch-size 16 --eval-prompts 0)
declare -A ARGS=(
  [sft]="--data bundled:instructions_train --batch-size 8 --lr 1e-5"
  [rm]="--data $PAIRS --batch-size 8 --lr 1e-5"
  [dpo]="--data $PAIRS --batch-size 8 --lr 5e-7"
  [grpo]="${ONLINE[*]} --lr 1e-6"
  [ppo]="${ONLINE[*]} --lr 1e-6"
)

LAYOUTS=()
if [[ "$GPUS" == "1" ]]; then
  LAYOUTS=(single)
  if "$PYTHON" -c 'import vllm' 2>/dev/null; then LAYOUTS+=(vllm); else echo "gpu_check: vllm not importable; no vLLM-generation runs"; fi
else
  LAYOUTS=(ddp fsdp2)
  if "$PYTHON" -c 'import deepspeed' 2>/dev/null; then LAYOUTS+=(zero2); else echo "gpu_check: deepspeed not installed; no ZeRO-2 runs"; fi
fi

FAILED=0
for layout in "${LAYOUTS[@]}"; do
  for cmd in sft rm dpo grpo ppo; do
    extra=()
    if [[ "$layout" == vllm ]]; then  # builtin vs vLLM generation: only the commands that sample
      if [[ "$cmd" != grpo && "$cmd" != ppo ]]; then continue; fi
      extra=(--generator vllm)
    fi
    run="$OUT/$layout-$cmd"
    rm -rf "$run"
    if [[ "$layout" == single || "$layout" == vllm ]]; then launch=("$PYTHON" -m alignkit.cli)
    else launch=("$PYTHON" -m accelerate.commands.launch --config_file "examples/accelerate/$layout.yaml" --num_processes "$GPUS" -m alignkit.cli)
    fi
    echo "gpu_check: $layout $cmd"
    # shellcheck disable=SC2086  # ARGS entries are word lists
    if ! "${launch[@]}" "$cmd" "${COMMON[@]}" ${ARGS[$cmd]} "${extra[@]}" --output-dir "$run" > "$OUT/$layout-$cmd.log" 2>&1; then
      echo "gpu_check: $layout $cmd FAILED; last lines of $OUT/$layout-$cmd.log:"; tail -5 "$OUT/$layout-$cmd.log"
      FAILED=1
    fi
  done
done

"$PYTHON" - "$OUT" "$GPUS" "${LAYOUTS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, gpus, layouts = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
print(f"\n{'layout':8} {'command':8} {'step s':>8} {'tokens/s':>10} {'peak GB':>8} {'final loss':>11}")
for layout in layouts:
    world = 1 if layout in ("single", "vllm") else gpus
    for cmd in ("sft", "rm", "dpo", "grpo", "ppo"):
        path = out / f"{layout}-{cmd}" / "metrics.jsonl"
        if not path.exists():
            continue
        # one row per training step (online trainers: per rollout + its updates); step 0 is the pre-training eval
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] > 0 and "tokens" in r]
        if len(rows) < 2:
            print(f"{layout:8} {cmd:8} {'(too few steps logged)':>40}")
            continue
        seconds = rows[-1]["time"] - rows[0]["time"]
        # `tokens` is per optimizer step and process (online trainers log the mean over a rollout's updates)
        tokens = sum(r["tokens"] * (r["step"] - prev["step"]) for prev, r in zip(rows, rows[1:])) * world
        peak = max(r.get("gpu_mem_peak_gb", 0.0) for r in rows)
        loss = rows[-1].get("loss", rows[-1].get("policy_loss", float("nan")))
        print(f"{layout:8} {cmd:8} {seconds / (len(rows) - 1):8.3f} {tokens / max(seconds, 1e-9):10.0f} {peak:8.2f} {loss:11.4f}")
EOF
exit "$FAILED"
