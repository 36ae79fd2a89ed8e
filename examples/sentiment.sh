#!/usr/bin/env bash
# Controlled-sentiment generation on the bundled SmolLM2-135M-Instruct: the DPO paper's IMDb experiment in
# miniature (Rafailov et al. 2023, sec. 6). The policy continues movie-review openings (alignkit/bundled);
# VADER's compound sentiment score in [-1, 1] is the ground-truth reward. Every method trains a LoRA adapter
# and is evaluated the same way: 4 samples per held-out prompt (40 prompts), fixed seed, temperature 1,
# mean VADER score, KL(policy || base) per response, distinct-2 (falls if the policy collapses).
#
#   examples/sentiment.sh [dpo|grpo|ppo|raft|all]      (from the repo root, after `make test` or `make demo`)
#
# Results go to runs/sentiment/<method>/ and runs/sentiment/results.jsonl; README.md quotes a run.
set -euo pipefail
cd "$(dirname "$0")/.."
AK=".venv/bin/alignkit"
OUT=runs/sentiment
TRAIN=bundled:movie_prompts_train
TEST=bundled:movie_prompts_test
COMMON=(--reward vader --max-new-tokens 32)
mkdir -p "$OUT"

evaluate() {  # evaluate NAME MODEL
  local start=$SECONDS
  "$AK" evaluate --model "$2" --data "$TEST" "${COMMON[@]}" --group-size 4 --output "$OUT/$1/eval.json"
  echo "{\"method\": \"$1\", \"eval_seconds\": $((SECONDS - start)), \"train_seconds\": ${TRAIN_SECONDS:-0}, \"eval\": $(cat "$OUT/$1/eval.json")}" \
    >> "$OUT/results.jsonl"
}

timed() {  # timed CMD...: runs it, sets TRAIN_SECONDS
  local start=$SECONDS
  "$@"
  TRAIN_SECONDS=$((SECONDS - start))
}

base() {
  mkdir -p "$OUT/base"
  TRAIN_SECONDS=0 evaluate base smollm2-135m
}

dpo() {
  # pairs: 4 samples per training prompt from the base model, best vs worst VADER score
  timed "$AK" bon --model smollm2-135m --data "$TRAIN" "${COMMON[@]}" --group-size 4 --prompts-per-step 50 \
    --output-dir "$OUT/dpo-pairs"
  local sampling=$TRAIN_SECONDS
  timed "$AK" dpo --model smollm2-135m --lora --data "$OUT/dpo-pairs/pairs.jsonl" --beta 0.1 --lr 2e-4 \
    --epochs 3 --batch-size 8 --warmup-ratio 0.1 --max-length 256 --report-to none --output-dir "$OUT/dpo"
  TRAIN_SECONDS=$((TRAIN_SECONDS + sampling)) evaluate dpo "$OUT/dpo"
}

grpo() {
  timed "$AK" grpo --model smollm2-135m --lora --data "$TRAIN" "${COMMON[@]}" --prompts-per-step 16 --group-size 4 \
    --batch-size 32 --grad-accum 2 --lr 5e-4 --beta 0.04 --max-steps 25 --eval-prompts 0 --report-to none \
    --output-dir "$OUT/grpo"
  evaluate grpo "$OUT/grpo"
}

ppo() {
  timed "$AK" ppo --model smollm2-135m --lora --data "$TRAIN" "${COMMON[@]}" --prompts-per-step 32 \
    --batch-size 16 --grad-accum 1 --lr 1e-4 --kl-coef 0.05 --max-steps 25 --eval-prompts 0 --report-to none \
    --output-dir "$OUT/ppo"
  evaluate ppo "$OUT/ppo"
}

raft() {
  timed "$AK" raft --model smollm2-135m --lora --data "$TRAIN" "${COMMON[@]}" --prompts-per-step 50 --group-size 4 \
    --stages 8 --sft-epochs 2 --batch-size 8 --lr 5e-4 --eval-prompts 0 --report-to none --output-dir "$OUT/raft"
  evaluate raft "$OUT/raft"
}

case "${1:-all}" in
  all) base; dpo; grpo; ppo; raft ;;
  base|dpo|grpo|ppo|raft) "$1" ;;
  *) echo "usage: $0 [base|dpo|grpo|ppo|raft|all]" >&2; exit 2 ;;
esac
