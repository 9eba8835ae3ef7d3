#!/usr/bin/env bash
# A CUDA machine's environment for `make gpu-check`: vLLM's GPU build of the same minor version
# the plugin targets (vllm==0.32.*, with the CUDA torch it pins) and the project with its test
# tools, in .venv-gpu. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.12}
command -v "$PY" >/dev/null || PY=python3.11
VENV=${VENV:-.venv-gpu}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[gpu,dev]"
"$VENV/bin/python" - <<'PYEOF'
import torch, vllm, stts_vllm
assert vllm.__version__.startswith("0.32."), vllm.__version__
assert torch.cuda.is_available(), "the installed torch sees no CUDA device"
print("gpu install ok: vllm", vllm.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))
PYEOF
