#!/usr/bin/env bash
# Wall time of `alignkit quickstart` (sample -> DPO with LoRA -> evaluate before/after -> report) from a fresh run
# directory, with what the result depends on: CPU flags (native bf16 or not), cores, and the load from other jobs.
#   bench/bench_quickstart.sh [RUN_DIR]          (from the repo root; target: under 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/bench-quickstart}
AK=${AK:-.venv/bin/alignkit}
PY=${PY:-.venv/bin/python}
rm -rf "$RUN"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc --all) cores," \
     "avx512_bf16: $(grep -qw avx512_bf16 /proc/cpuinfo && echo yes || echo no), amx_bf16: $(grep -qw amx_bf16 /proc/cpuinfo && echo yes || echo no)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
"$AK" quickstart --run-dir "$RUN"
end=$(date +%s.%N)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'quickstart wall time: %.0f s\n' "$(echo "$end - $start" | bc)"
"$PY" -c "import json,sys; [print(f\"  {r['name']:<10} {r['status']:<8} {r['seconds']:6.0f} s\") for r in json.load(open(sys.argv[1]))]" "$RUN/stages.json"
