# The front door. `make serve` and `make test` each do everything from a fresh clone.
SHELL := /bin/bash
PY := .venv/bin/python
DEMO := artifacts/demo-stts
PORT ?= 8000
export HF_HUB_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install demo serve test lint clean

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

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: install
	bash scripts/install_test_tools.sh
	.venv/bin/ruff check .
	bash scripts/run_tests.sh

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
