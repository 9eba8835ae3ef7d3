#!/usr/bin/env bash
# The three-seed table of the top-k exploration recipe (README, "Telling the scorer what
# dropping a unit costs"): each quality3 base (the paper's recipe, 1200 steps resumed to 2400)
# continued 400 steps with `--explore 1 --policy-weight 2 --answer-loss-on top_k`, training
# seeds 6 / 7 / 8, then every row of every seed evaluated and aggregated by `quality` (it finds
# the trained seeds and only evaluates them). Bases and runs that exist are reused, so a
# stopped run continues. About 1.5 h per missing base, 15 min of training and 9 min of
# evaluation per seed on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage.sh
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
"$cli" quality artifacts/quality-explore --seeds '[0,1,2]' "${knobs[@]}"
