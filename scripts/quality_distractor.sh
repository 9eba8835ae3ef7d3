#!/usr/bin/env bash
# The three-seed table on the decoy distractor split (README, "A distractor split that needs
# selection"). Per seed, three stages of `stts-vllm train`, then every row of every seed
# evaluated and aggregated by `quality` (it finds the trained seeds and only evaluates them):
#   1. base: a fresh demo with a 4-layer LLM, the paper's recipe, 1200 steps;
#   2. teach: 150 steps of distractor questions only, unpruned (keep 1.0), lr 1e-3: in the
#      mixed training the answer barely shows (one question in seven, three in four of them
#      pruned by a scorer that drops the answer); a probe continuing a model trained on the
#      earlier split stayed at chance on it for 750 mixed steps, and seed 0's base answers
#      it 75% of the time at keep 1.0 (100% after this stage);
#   3. explore: 800 steps of the top-k exploration recipe on a mix that asks the distractor
#      question three times in nine, so the scorer learns to keep the answer among the decoys.
# Stages that exist are reused, so a stopped run continues. Each seed took 23-27 min of base,
# 3 min of teaching, 22 min of exploring and 10 min of evaluation on 2 CPU cores (about three
# hours for the three seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
cli=.venv/bin/stts-vllm
root=artifacts/quality-distractor
tasks='[distractor,distractor,distractor,color,flash,order,count,changed,direction]'
knobs=(--steps 800 --warmup 20 --lr 0.0003 --explore 1 --policy-weight 2
  --answer-loss-on top_k --tasks "$tasks")
seeds=${SEEDS:-0 1 2}
for s in $seeds; do
  base=$root/base-$s
  if [[ ! -f $base/checkpoint/config.json ]]; then
    "$cli" train "$base" --seed "$s" --text-layers 4 --steps 1200 --resume true
  fi
  teach=$root/teach-$s
  if [[ ! -f $teach/checkpoint/config.json ]]; then
    "$cli" train "$teach" --init "$base/checkpoint" --seed $((3 + s)) --steps 150 --warmup 20 \
      --lr 0.001 --keep-ratios '[1.0]' --tasks '[distractor]' --resume true
  fi
  run=$root/seed-$s
  if [[ ! -f $run/checkpoint/config.json ]]; then
    "$cli" train "$run" --init "$teach/checkpoint" --seed $((6 + s)) "${knobs[@]}" --resume true
  fi
done
"$cli" quality "$root" --seeds "[${seeds// /,}]" "${knobs[@]}"
