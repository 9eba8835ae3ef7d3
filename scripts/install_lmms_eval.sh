#!/usr/bin/env bash
# lmms-eval, the video-VLM evaluation harness, in a venv of its own (.venv-lmms-eval): the
# client that `make test` points at a live stts-serve (tests/server/test_lmms_eval.py) and the
# one docs/eval.md uses. Its own venv because it pins transformers/datasets/openai versions of
# its own, which must not move the server's. Safe to rerun: skipped when already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${LMMS_EVAL_VENV:-.venv-lmms-eval}
LMMS_EVAL_VERSION=0.7.3
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}  # the CPU wheel on disk; a CUDA build must never come in

ready() {
  "$VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('lmms_eval') != '${LMMS_EVAL_VERSION}')
import lmms_eval.models.chat.openai, lmms_eval.models.chat.async_openai
" 2>/dev/null
}

start=$(date +%s)
if ready; then
  echo "install_lmms_eval: lmms-eval ${LMMS_EVAL_VERSION} already in ${VENV}"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# filelock<3.20: lmms-eval 0.7.3 imports filelock._api, which newer releases dropped.
# decord: the video reader its default mode (qwen-vl-utils) decodes the clips with.
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC}" "lmms-eval==${LMMS_EVAL_VERSION}" \
  "filelock<3.20" "decord==0.6.0"
"$VENV/bin/python" scripts/guard_torchvision.py  # PyPI's torchvision beside the CPU torch
ready || { echo "install_lmms_eval: lmms-eval does not import in ${VENV}" >&2; exit 1; }
echo "install_lmms_eval: lmms-eval ${LMMS_EVAL_VERSION} installed in $(( $(date +%s) - start )) s"
