#!/usr/bin/env bash
# The three-seed recipes on the decoy distractor split: per seed, stages of `stts-vllm train`
# (experiments/stage.sh), then every seed evaluated and aggregated by experiments.quality.
#   bash experiments/quality_distractor.sh               # base, teach, explore
#   CURRICULUM=1 bash experiments/quality_distractor.sh  # then one task at a time, explore
#   CHAIN=1 bash experiments/quality_distractor.sh       # base, a chain of tasks, explore
# SEEDS="0 1 2" picks the seeds; DEVICE=cuda and THREADS=N reach every stage. Stages that
# exist are reused, so a stopped run continues. What each recipe is for, what it found and
# how long it took: experiments/README.md.
set -euo pipefail -o noglob  # task lists like [direction] are not globs
shopt -s inherit_errexit  # a failed stage inside run_stages stops the script
cd "$(dirname "$0")/.."
source experiments/stage.sh
bases=artifacts/quality-distractor
root=$bases
if [[ ${CURRICULUM:-0} == 1 && ${CHAIN:-0} == 1 ]]; then
  echo "CURRICULUM=1 and CHAIN=1 are two recipes: set one" >&2
  exit 2
fi
[[ ${CURRICULUM:-0} == 1 ]] && root=artifacts/quality-curriculum
[[ ${CHAIN:-0} == 1 ]] && root=artifacts/quality-chain
tasks='[distractor,distractor,distractor,color,flash,order,count,changed,direction]'
knobs=(--steps 800 --warmup 20 --lr 0.0003 --explore 1 --policy-weight 2
  --answer-loss-on top_k --tasks "$tasks")
unpruned=(--warmup 20 --keep-ratios '[1.0]')
mix='[direction,changed,count,color,direction,changed,count,order,flash,distractor]'
# CURRICULUM=1: unpruned stages 4a-4g after each explored seed, then stage 3's exploring
# again into artifacts/quality-curriculum; one stage a line: NAME SEED-OFFSET ARGS
curriculum=(
  "direction 11 --steps 1500 --lr 0.0005 --tasks [direction] --until direction=0.8 --eval-every 100"
  "changed 12 --steps 500 --lr 0.0005 --tasks [changed,changed,direction]"
  "changed-only 13 --steps 1500 --lr 0.001 --tasks [changed] --until changed=0.8 --eval-every 100"
  "mix 14 --steps 400 --lr 0.0003 --tasks $mix"
  "mix-count 25 --steps 500 --lr 0.0005 --tasks [count,count,count,changed,changed,direction,color,order,flash,distractor]"
  "count-changed 26 --steps 500 --lr 0.001 --tasks [count,count,count,changed,direction]"
  "mix-changed 27 --steps 500 --lr 0.0003 --tasks [changed,changed,changed,count,count,direction,color,order,flash,distractor]"
)
# CHAIN=1: unpruned stages c1-c5 between each base and stage 3's exploring, into
# artifacts/quality-chain; `--until` bars must hold at two evaluations in a row
until=(--eval-every 100 --until-evals 2 --lr 0.001)
chain=(
  "direction 11 --steps 800 --tasks [direction] --until direction=0.8 ${until[*]}"
  "changed-alone 12 --steps 1600 --tasks [changed-alone] --until changed-alone=0.8 ${until[*]}"
  "changed 13 --steps 1600 --tasks [changed-alone,changed] --until changed=0.8 ${until[*]}"
  "mix 14 --steps 600 --lr 0.0003 --tasks [color,direction,order,count,changed,flash,distractor,changed,changed-alone]"
  "teach 15 --steps 150 --lr 0.001 --tasks [distractor]"
)

# run_stages ROOT PREV SEED STAGE...: chained unpruned stages from PREV, echo the last one
run_stages() {
  local root=$1 prev=$2 s=$3 line name seed args
  shift 3
  for line in "$@"; do
    read -r name seed args <<<"$line"
    # shellcheck disable=SC2086  # args is a list of flags without spaces inside
    stage "$root/$name-$s" "$prev" $((seed + 10 * s)) "${unpruned[@]}" $args >&2
    prev=$root/$name-$s
  done
  echo "$prev"
}

seeds=${SEEDS:-0 1 2}
for s in $seeds; do
  stage "$bases/base-$s" "" "$s" --text-layers 4 --steps 1200
  if [[ $root == artifacts/quality-chain ]]; then
    prev=$(run_stages "$root" "$bases/base-$s" "$s" "${chain[@]}")
    stage "$root/seed-$s" "$prev" $((6 + s)) "${knobs[@]}"
    continue
  fi
  stage "$bases/teach-$s" "$bases/base-$s" $((3 + s)) --steps 150 --lr 0.001 "${unpruned[@]}" \
    --tasks '[distractor]'
  stage "$bases/seed-$s" "$bases/teach-$s" $((6 + s)) "${knobs[@]}"
  [[ $root == "$bases" ]] && continue
  prev=$(run_stages "$root" "$bases/seed-$s" "$s" "${curriculum[@]}")
  stage "$root/seed-$s" "$prev" $((6 + s)) "${knobs[@]}"
done
.venv/bin/python -m experiments.quality "$root" --seeds "[${seeds// /,}]" "${knobs[@]}"
