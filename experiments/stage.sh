# Sourced by the quality recipes (experiments/quality_*.sh): one training stage that a stopped
# run skips or continues.
# stage OUT INIT SEED ARGS...: `stts-vllm train OUT` from INIT's checkpoint (none: a fresh
# demo) unless OUT already has a whole checkpoint (train renames it into place when done),
# resuming OUT/last if a stopped run left one.
stage() {
  local out=$1 init=$2 seed=$3
  shift 3
  [[ -f $out/checkpoint/config.json ]] && return 0
  local from=()
  [[ -n $init ]] && from=(--init "$init/checkpoint")
  # DEVICE=cuda trains there (states are saved device-free: a stage resumes anywhere);
  # THREADS=N caps torch's CPU threads, so stages run side by side do not oversubscribe
  .venv/bin/stts-vllm train "$out" "${from[@]}" --seed "$seed" "$@" --resume true \
    ${DEVICE:+--device "$DEVICE"} ${THREADS:+--threads "$THREADS"}
}
