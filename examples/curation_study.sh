#!/usr/bin/env bash
# Curation study (issue 10): build a noisy movie-review SFT pool from the base model's own samples, then run
# examples/curation_study.yaml (curated vs random subsets vs the whole pool; SFT; held-out loss and VADER reward).
#   examples/curation_study.sh            (from the repo root; results: runs/curation_study/run/report.html)
set -euo pipefail
cd "$(dirname "$0")/.."
AK=${AK:-.venv/bin/alignkit}
PY=${PY:-.venv/bin/python}
OUT=runs/curation_study
[ -f "$OUT/pool_samples/bon.jsonl" ] || $AK bon --model smollm2-135m --data bundled:movie_prompts_train \
  --reward vader --group-size 4 --max-new-tokens 48 --prompts-per-step 50 --output-dir "$OUT/pool_samples"
[ -f "$OUT/heldout_samples/bon.jsonl" ] || $AK bon --model smollm2-135m --data bundled:movie_prompts_test \
  --reward vader --group-size 8 --max-new-tokens 48 --prompts-per-step 40 --output-dir "$OUT/heldout_samples"
$PY examples/make_curation_pool.py "$OUT/pool_samples/bon.jsonl" "$OUT/heldout_samples/bon.jsonl" "$OUT/pool"
$AK run examples/curation_study.yaml "$@"
