#!/usr/bin/env bash
# RLAIF in miniature on the controlled-sentiment task (Lee et al. 2023; the DPO paper's IMDb setup, alignkit/bundled).
# SmolLM2-135M-Instruct writes two continuations per movie-review opening; the same model, as a judge, says which
# one is more positive; VADER is the ground truth. The judge prompt is chosen on a development split (the first
# DEV openings) and reported on the held-out rest: agreement with VADER from one order (before debiasing) and from
# both orders averaged (after), position consistency, and the same with chain of thought on COT pairs.
# Then one `alignkit critique` run on a few bundled instructions.
#
#   examples/rlaif.sh [samples|dev|test|cot|critique|all]          (from the repo root)
#
# Results: runs/rlaif/*/summary.json; README.md quotes a run.
set -euo pipefail
cd "$(dirname "$0")/.."
AK=${AK:-.venv/bin/alignkit}
MODEL=${MODEL:-smollm2-135m}   # policy and judge
OUT=runs/rlaif
PROMPTS=${PROMPTS:-150}   # openings of bundled:movie_prompts_train sampled (two continuations each)
DEV=${DEV:-50}            # the first DEV of them choose the judge prompt; the rest are held out
COT=${COT:-40}            # held-out pairs also judged with chain of thought
MOVIE_PREAMBLE="Below is the opening of a movie review and two possible continuations of it."
PRINCIPLE_A="Which response is more positive about the movie?"
PRINCIPLE_B="Which continuation expresses a more positive opinion of the movie?"
mkdir -p "$OUT"

samples() {
  $AK bon --model "$MODEL" --data bundled:movie_prompts_train --reward vader --group-size 2 \
    --max-new-tokens 32 --max-prompts "$PROMPTS" --prompts-per-step 50 --output-dir "$OUT/samples"
  head -n "$DEV" "$OUT/samples/bon.jsonl" > "$OUT/dev.jsonl"
  tail -n +"$((DEV + 1))" "$OUT/samples/bon.jsonl" > "$OUT/test.jsonl"
  head -n "$COT" "$OUT/test.jsonl" > "$OUT/test-cot.jsonl"
}

judge() {  # judge NAME DATA [extra label flags...]
  local name=$1 data=$2
  shift 2
  # one cache for all runs: the plain judge on the CoT subset reuses the held-out run's answers
  $AK label --data "$data" --judge "local:$MODEL" --ground-truth vader --output-dir "$OUT/$name" \
    --cache "$OUT/judge_cache.sqlite" "$@" \
    > "$OUT/$name.log"
  echo "$name: $(python3 -c "import json,sys; s=json.load(open(sys.argv[1])); g=s['ground_truth']; print(
    f\"pairs {s['pairs']}, agreement one order {g['agreement_single_order']:.3f}, both orders {g['agreement']:.3f}, \"
    f\"position consistency {s['position_consistency']:.3f}, first shown wins {s['first_position_wins']:.3f}\")" \
    "$OUT/$name/summary.json")"
}

dev() {  # two prompts (default vs movie preamble, two wordings of the principle) on the development split
  judge dev-a "$OUT/dev.jsonl" --principle "$PRINCIPLE_A"
  judge dev-b "$OUT/dev.jsonl" --principle "$PRINCIPLE_B" --preamble "$MOVIE_PREAMBLE"
}

best() {  # the dev prompt with the higher debiased agreement
  python3 -c "import json; a, b = (json.load(open(f'$OUT/dev-{k}/summary.json'))['ground_truth']['agreement']
    for k in 'ab'); print('a' if a >= b else 'b')"
}

flags() {  # flags of dev prompt $1
  if [ "$1" = a ]; then echo --principle; echo "$PRINCIPLE_A"; else
    echo --principle; echo "$PRINCIPLE_B"; echo --preamble; echo "$MOVIE_PREAMBLE"; fi
}

test_() {
  local choice
  choice=$(best)
  mapfile -t chosen < <(flags "$choice")
  echo "judge prompt chosen on the dev split: $choice"
  judge "test-$choice" "$OUT/test.jsonl" "${chosen[@]}"
}

cot() {
  local choice
  choice=$(best)
  mapfile -t chosen < <(flags "$choice")
  judge "test-cot-plain-$choice" "$OUT/test-cot.jsonl" "${chosen[@]}"
  judge "test-cot-$choice" "$OUT/test-cot.jsonl" "${chosen[@]}" --cot --cot-tokens 48 --batch-size 8
}

critique() {
  $AK critique --model "$MODEL" --data bundled:instructions_test --max-prompts 8 --rounds 1 \
    --sample-initial --max-new-tokens 64 --temperature 0.7 --output-dir "$OUT/critique"
}

case "${1:-all}" in
  samples) samples ;;
  dev) dev ;;
  test) test_ ;;
  cot) cot ;;
  critique) critique ;;
  all) samples; dev; test_; cot; critique ;;
  *) echo "usage: $0 [samples|dev|test|cot|critique|all]" >&2; exit 2 ;;
esac
