#!/usr/bin/env bash
# The top-k exploration recipe on three seeds: each quality3 base (the paper's recipe, 1200
# steps resumed to 2400) continued 400 steps with `--explore 1 --policy-weight 2
# --answer-loss-on top_k`, then every seed evaluated and aggregated by experiments.quality.
# Bases and runs that exist are reused, so a stopped run continues.
#   bash experiments/quality_explore.sh
# Findings and timings: experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/stage.sh
cli=.venv/bin/stts-vllm
knobs=(--steps 400 --warmup 20 --lr 0.0003 --explore 1 --policy-weight 2 --answer-loss-on top_k)
for s in 0 1 2; do
  base=artifacts/quality3/seed-$s
  if [[ ! -f $base/checkpoint/config.json ]]; then
    "$cli" train "$base" --seed "$s" --text-layers 4 --steps 1200
    "$cli" train "$base" --seed "$s" --text-layers 4 --steps 2400 --resume true
  fi
  stage artifacts/quality-explore/seed-$s "$base" $((6 + s)) "${knobs[@]}"
done
.venv/bin/python -m experiments.quality artifacts/quality-explore --seeds '[0,1,2]' "${knobs[@]}"
