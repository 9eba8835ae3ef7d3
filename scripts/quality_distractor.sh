#!/usr/bin/env bash
# The three-seed table on the decoy distractor split (README, "A distractor split that needs
# selection"). Per seed, stages of `stts-vllm train`, then every row of every seed evaluated
# and aggregated by `quality` (it finds the trained seeds and only evaluates them):
#   1. base: a fresh demo with a 4-layer LLM, the paper's recipe, 1200 steps;
#   2. teach: 150 steps of distractor questions only, unpruned (keep 1.0), lr 1e-3: in the
#      mixed training the answer barely shows (one question in seven, three in four of them
#      pruned by a scorer that drops the answer); a probe continuing a model trained on the
#      earlier split stayed at chance on it for 750 mixed steps, and seed 0's base answers
#      it 75% of the time at keep 1.0 (100% after this stage);
#   3. explore: 800 steps of the top-k exploration recipe on a mix that asks the distractor
#      question three times in nine, so the scorer learns to keep the answer among the decoys.
# CURRICULUM=1 continues each seed's explored model (stage 3) with a curriculum for the tasks
# a mix never teaches (README, "A curriculum for direction, changed and count"), one task at a
# time, unpruned, then explores again (stage 3's recipe) into artifacts/quality-curriculum:
#   4a. direction only at lr 5e-4 until 80% of the val direction clips are right, at most
#       1500 steps (the answer loss sits at chance, then falls: the LLM learns to read a
#       token's side only when nothing else is asked; seed 0 left chance after ~100 steps of
#       a fixed 400, seed 1 stayed at chance for all 400 and, with --until, stopped at 800);
#   4b. changed twice in three (direction the third), 500 steps at lr 5e-4 (stays at chance,
#       but 4c needs it: changed only straight after 4a stayed at chance for 500 steps);
#   4c. changed only at lr 1e-3 until 80% of the val changed clips are right, at most 1500
#       steps (seed 0 left chance after ~200 steps; seed 1's first run after ~600, its second
#       not in 1166: a fixed 500 fitted seed 0 only; seed 0's README figures come from it);
#   4d. every task, the three above twice, 400 steps at lr 3e-4: brings back what the
#       single-task stages made the model forget (and teaches the distractor: 99% at keep 1.0);
#   4e. the mix with count three times in ten and changed twice, 500 steps at lr 5e-4 (a
#       count-only stage taught count, 36% -> 97%, but lost changed for good: seed 0's first
#       curriculum, README; this one keeps changed, 96%, and count climbs to 55%);
#   4f. count three times in five, changed and direction once, 500 steps at lr 1e-3 (count
#       93%, changed 64%; the tasks it leaves out fall to 0-26%);
#   4g. every task, changed three times in ten and count twice, 500 steps at lr 3e-4 (seed 0
#       after it: changed 77%, count 94%, direction 100%, the others 98-100%; after the
#       exploration stage, keep 1.0 95.7%, but the learned scorer drops changed's evidence at
#       0.5: see the README).
# CHAIN=1 instead puts a chain of unpruned stages between each seed's base (stage 1) and
# exploring (stage 3's recipe), into artifacts/quality-chain; in c1-c3 lr 1e-3 and each
# `--until` bar must hold at two evaluations in a row (`--until-evals 2`). Seed 0's figures:
#   c1. direction only until 80% (53% at step 100, 100% at 200 and 300; 5 min);
#   c2. changed-alone (changed with the still shape left out: the answer is the side of the
#       only shape) until 80% (91 / 92% at steps 100 / 200; 3 min): plain changed sits at
#       chance from every start tried (README, "Five probes of changed");
#   c3. changed-alone and changed, one each, until changed holds 80%, at most 1600 steps
#       (changed 56% at step 100, 86 / 79 / 84 / 88% at 400-700; 11 min). The cap was 800:
#       a rerun of seed 0 on the CPU crossed the bar only at step 800, and four training
#       seeds from the same c2 model on a GPU held it at steps 800, 900, 900, 900;
#   c4. every task, changed and changed-alone once more, 600 steps at lr 3e-4 (10 min): on a
#       probe, the base recipe after c3 without them lost changed (51%), with them kept it;
#       after c4 every task is back but the distractor (24%) and count (22%);
#   c5. stage 2's teaching (the distractor 76%; 3 min).
# Seed 0: 70 min of training in all (base 21, chain 34, exploring 18), then keep 1.0 89.3%
# with changed 93% and direction 98% (README, "A chain for direction and changed"). Seed 2
# (base and c1 on a GPU, `DEVICE=cuda THREADS=7`, the rest here): keep 1.0 70.2%, six targets.
# Stages that exist are reused, so a stopped run continues. (With the batched vision blocks,
# seed 1's second run: base 20 min, teaching 2.5, exploring 17.) On 2 CPU cores each seed took
# 23-27 min of base, 3 min of teaching, 22 min of exploring and 10 min of evaluation (about
# three hours for the three seeds); the curriculum adds about 71 min of stages per seed
# (seed 0, step time: 7 + 10 + 11 + 8 + 11 + 12 + 12, the last with two evaluations), then
# 26 of exploring again.
set -euo pipefail -o noglob  # task lists like [direction] are not globs
shopt -s inherit_errexit  # a failed stage inside run_stages stops the script
cd "$(dirname "$0")/.."
source scripts/stage.sh
cli=.venv/bin/stts-vllm
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
# CURRICULUM=1 stages: NAME SEED-OFFSET ARGS (4a-4g above)
curriculum=(
  "direction 11 --steps 1500 --lr 0.0005 --tasks [direction] --until direction=0.8 --eval-every 100"
  "changed 12 --steps 500 --lr 0.0005 --tasks [changed,changed,direction]"
  "changed-only 13 --steps 1500 --lr 0.001 --tasks [changed] --until changed=0.8 --eval-every 100"
  "mix 14 --steps 400 --lr 0.0003 --tasks $mix"
  "mix-count 25 --steps 500 --lr 0.0005 --tasks [count,count,count,changed,changed,direction,color,order,flash,distractor]"
  "count-changed 26 --steps 500 --lr 0.001 --tasks [count,count,count,changed,direction]"
  "mix-changed 27 --steps 500 --lr 0.0003 --tasks [changed,changed,changed,count,count,direction,color,order,flash,distractor]"
)
# CHAIN=1 stages (c1-c5 above)
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
"$cli" quality "$root" --seeds "[${seeds// /,}]" "${knobs[@]}"
