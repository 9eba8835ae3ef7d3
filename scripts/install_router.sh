#!/usr/bin/env bash
# vLLM's router (`vllm-router`, a Rust binary on PyPI) in a venv of its own (.venv-router): what
# `make serve-replicas` puts in front of several stts-serve replicas, and what the tests route
# through. Pinned: its policies' keys and flags are what docs/deploy.md documents. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${ROUTER_VENV:-.venv-router}
VLLM_ROUTER_VERSION=0.1.17

if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-router') != '${VLLM_ROUTER_VERSION}')" 2>/dev/null; then
  echo "install_router: vllm-router ${VLLM_ROUTER_VERSION} already in ${VENV}"
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "vllm-router==${VLLM_ROUTER_VERSION}"
"$VENV/bin/vllm-router" --help >/dev/null
echo "install_router: vllm-router ${VLLM_ROUTER_VERSION} installed in $(( $(date +%s) - start )) s"
