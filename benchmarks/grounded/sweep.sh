#!/usr/bin/env bash
# Run every line of configs.txt (NAME DATA STEPS FIRST_TOKEN_WEIGHT [--set ...]) through one.sh, P at a time,
# and collect one JSON line per config into $OUT/results.jsonl (default runs/sweep/results.jsonl).
# Needs the data folders from data.sh and a prepared model; made for a CUDA machine (one config ~1-2.5 min on an
# H200 with 4 at a time); on 2 CPU cores one 160-step config takes hours.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
OUT=${OUT:-runs/sweep}; mkdir -p "$OUT" /tmp/sw
T0=$(date +%s)
timeout ${SWEEP_S:-3600} xargs -P ${P:-4} -L 1 bash benchmarks/grounded/one.sh < benchmarks/grounded/${CONFIGS:-configs.txt}
cat /tmp/sw/*.json > "$OUT/results.jsonl"
echo "total $(( $(date +%s) - T0 )) s"; wc -l "$OUT/results.jsonl"
