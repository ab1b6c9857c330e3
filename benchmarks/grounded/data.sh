#!/usr/bin/env bash
# Build the sweep's data folders (train + valid only: the sweep never sees the test split).
# usage: benchmarks/grounded/data.sh [DATA_ROOT]   (default runs/sweep-data)
set -euo pipefail
root=${1:-runs/sweep-data}
B="${PY:-python3} -m mlx_lora data build"
G="--set data.mode=grounded"
$B --out $root/closed >/dev/null
$B --out $root/g $G --set data.oracle_rate=1.0 >/dev/null
$B --out $root/g_or8 $G --set data.oracle_rate=0.8 >/dev/null
$B --out $root/g_shuf $G --set data.oracle_rate=1.0 --set data.shuffle_passages=true >/dev/null
$B --out $root/g_ar6 $G --set data.oracle_rate=1.0 --set data.answerable_ratio=0.6 >/dev/null
$B --out $root/g_or8_shuf $G --set data.oracle_rate=0.8 --set data.shuffle_passages=true >/dev/null
rm -f $root/*/test.jsonl
