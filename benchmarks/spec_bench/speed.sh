#!/usr/bin/env bash
# The main job's speed on the four spec_bench sets (issue #17): plain decoding of the same target
# (skinny linear layers), stock generate() (torch's linear layers), transformers' prompt lookup, and C2T
# with the cost rule and the n-gram branches each on and off, every row of a set in one process.
#
#   OUT=runs/speed LIMIT=5 TOKENS=256 bash benchmarks/spec_bench/speed.sh
#   TEMPERATURE=1 SETS=mt_bench bash benchmarks/spec_bench/speed.sh   # sampling
#   BUDGET=auto NGRAM=10 bash benchmarks/spec_bench/speed.sh   # the default C2T only, no ablation rows
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/spec_bench}"
OUT="${OUT:-runs/spec_bench_speed}"
SETS="${SETS:-mt_bench humaneval alpaca sum}"
LIMIT="${LIMIT:-5}"
TOKENS="${TOKENS:-256}"
TEMPERATURE="${TEMPERATURE:-0}"
STRATEGIES="${STRATEGIES:-ar,ar_stock,prompt_lookup,c2t}"
BUDGET="${BUDGET:-none,auto}"  # c2t rows: cost rule off / on
NGRAM="${NGRAM:-0,10}"         # c2t rows: n-gram branches off / on
export HF_HUB_OFFLINE=1
for set in $SETS; do
  echo "== $set ($(date +%H:%M:%S))"
  c2t-fast bench --prompts "$DATA/$set.jsonl" --limit "$LIMIT" --max-new-tokens "$TOKENS" \
    --temperature "$TEMPERATURE" --strategies "$STRATEGIES" --budget "$BUDGET" --ngram "$NGRAM" \
    --device cpu --out "$OUT/$set"
done
python benchmarks/spec_bench/speed_report.py "$OUT" > "$OUT/speed.md"
