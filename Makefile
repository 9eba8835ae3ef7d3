# The front door. `make serve` and `make test` each do everything from a fresh clone.
SHELL := /bin/bash
PY := .venv/bin/python
DEMO := artifacts/demo-stts
PORT ?= 8000
export HF_HUB_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install demo serve serve-replicas test lint clean gpu-check

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

$(DEMO)/config.json: | install
	$(PY) -m stts_vllm.cli make-demo $(DEMO)

demo: $(DEMO)/config.json

# The FastAPI front end (server/) with the engine in-process, on the demo checkpoint.
serve: install demo
	.venv/bin/stts-serve --model $(DEMO) --port $(PORT)

# N replicas of the demo on one files directory behind vLLM's router (vllm-router, pinned, in
# .venv-router) and the nginx gateway of deploy/compose.yaml, which clients use on PORT;
# replica i on PORT+i, the router on PORT+50. POLICY=consistent_hash|cache_aware|round_robin
N ?= 2
POLICY ?= consistent_hash
serve-replicas: install demo
	bash scripts/install_test_tools.sh
	bash scripts/install_router.sh
	N=$(N) PORT=$(PORT) POLICY=$(POLICY) MODEL=$(DEMO) bash scripts/serve_replicas.sh

# ruff, and the layer contracts of .importlinter (docs/development.md).
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports --no-cache

test: install
	bash scripts/install_test_tools.sh
	bash scripts/install_lmms_eval.sh
	bash scripts/install_router.sh
	.venv/bin/ruff check .
	.venv/bin/lint-imports --no-cache
	bash scripts/run_tests.sh

# A CUDA machine only (never CI): installs vllm==0.32.* in .venv-gpu, runs the engine suite in
# float32 and bfloat16 (V2 runner, CUDA graphs) and the 448² benchmark; one JSON + PNG report.
# GPU_CHECK_ARGS="--checkpoint /models/qwen2.5-vl-7b-stts" adds a real checkpoint.
gpu-check:
	bash scripts/install_gpu.sh
	.venv-gpu/bin/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
