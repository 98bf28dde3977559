#!/usr/bin/env bash
# C2T vs EAGLE-2 on the four spec_bench sets with the shipped SmolLM2 target, draft head and classifier.
# Resumable: a finished bench directory (summary.json present) is skipped.
#   LIMIT=4 MAX_NEW=256 OUT=runs/spec_bench bash benchmarks/spec_bench/run.sh
# LIMIT questions per set (first turns; all 80 when empty), MAX_NEW new tokens per answer, SETS which
# sets (the MT-bench-only runs — no second pruning, feature ablation, temperature 1 — come with mt_bench
# unless MT_EXTRAS=0; BASELINES=0 leaves out plain decoding and prompt lookup, whose wall clock means
# nothing when sets run side by side for their τ/γ counts). Extra flags for every c2t-fast bench call (e.g. --draft-full-vocab): BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
SETS=${SETS:-"mt_bench humaneval alpaca sum"}
DATA=${DATA:-../shared/data/spec_bench}
OUT=${OUT:-runs/spec_bench}
MAX_NEW=${MAX_NEW:-256}
LIMIT_ARG=${LIMIT:+--limit $LIMIT}
EAGLE_TOTALS=${EAGLE_TOTALS:-20,40,80}
C2T_BETAS=${C2T_BETAS:-0.5,0.7,0.85,0.95}
# Extra sweep points run as their own (resumable) directories, joined to the curves by report.py: larger
# EAGLE-2 trees / lower C2T thresholds to reach τ >= 1 where the main sweep stops short. Empty: none.
EAGLE_TOTALS_LARGE=${EAGLE_TOTALS_LARGE:-}
C2T_BETAS_LOW=${C2T_BETAS_LOW:-}
ABLATION_DIR=${ABLATION_DIR:-runs/classifier_ablation}
TREES=${TREES:-runs/trees}
MT_EXTRAS=${MT_EXTRAS:-1}
BASELINES=${BASELINES:-1}
BENCH_ARGS=${BENCH_ARGS:-}
export HF_HUB_OFFLINE=1

if [[ " $SETS " == *" mt_bench "* && $MT_EXTRAS == 1 && -d "$TREES" ]]; then  # feature-ablation classifiers (seconds each)
  for feats in P_H P_d H_d; do
    [[ -d "$ABLATION_DIR/$feats" ]] || c2t-fast train-classifier --data "$TREES" --val-fraction 0.2 --out "$ABLATION_DIR/$feats" \
      --features "${feats/_/,}"
  done
fi

bench() {  # name, extra args...
  local dir="$OUT/$1"; shift
  if [[ -f "$dir/summary.json" ]]; then echo "skip $dir (done)"; return; fi
  c2t-fast bench --max-new-tokens "$MAX_NEW" $LIMIT_ARG $BENCH_ARGS --out "$dir" "$@"
}

for set in $SETS; do
  q="$DATA/$set.jsonl"
  if [[ $BASELINES == 1 ]]; then bench "$set/baselines" --prompts "$q" --strategies ar,prompt_lookup; fi
  bench "$set/eagle2" --prompts "$q" --strategies eagle2 --top-k-tree 15 --depth 9 --sweep "total_tokens=$EAGLE_TOTALS"
  bench "$set/c2t" --prompts "$q" --strategies c2t --top-k-tree 15 --d-max 10 --sweep "beta=$C2T_BETAS"
  if [[ -n $EAGLE_TOTALS_LARGE ]]; then
    bench "$set/eagle2_large" --prompts "$q" --strategies eagle2 --top-k-tree 15 --depth 9 \
      --sweep "total_tokens=$EAGLE_TOTALS_LARGE"
  fi
  if [[ -n $C2T_BETAS_LOW ]]; then
    bench "$set/c2t_low_beta" --prompts "$q" --strategies c2t --top-k-tree 15 --d-max 10 --sweep "beta=$C2T_BETAS_LOW"
  fi
done
if [[ " $SETS " == *" mt_bench "* && $MT_EXTRAS == 1 ]]; then
q="$DATA/mt_bench.jsonl"
bench mt_bench/c2t_no_second_prune --prompts "$q" --strategies c2t --top-k-tree 15 --d-max 10 --no-second-prune \
  --sweep "beta=$C2T_BETAS"
for feats in P_H P_d H_d; do  # Table 1: classifiers trained on feature subsets (P+H+d is the shipped one)
  if [[ -d "$ABLATION_DIR/$feats" ]]; then
    bench "mt_bench/c2t_features_$feats" --prompts "$q" --strategies c2t --top-k-tree 15 --d-max 10 \
      --classifier "$ABLATION_DIR/$feats"
  fi
done
bench mt_bench/temperature_1 --prompts "$q" --strategies c2t,eagle2,ar --temperature 1.0 --top-k-tree 15 \
  --depth 9 --d-max 10
fi
python benchmarks/spec_bench/report.py "$OUT"
