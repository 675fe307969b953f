# The two commands a new user needs: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPE ?= recipes/tiny_cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test bench effect clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@set -e; base=$$(tools/find_python.sh); \
	  echo "[setup] creating $(VENV) with $$base ($$($$base --version))"; \
	  test -x $(PY) || $$base -m venv $(VENV)
	@# pip's own output goes to $(VENV)/setup.log; the console gets a line per phase (tools/setup_progress.py)
	@$(PY) tools/setup_progress.py --log $(VENV)/setup.log "upgrading pip" -- \
	  $(PY) -m pip install --progress-bar off --upgrade pip
	@$(PY) tools/setup_progress.py --log $(VENV)/setup.log \
	  "installing the project and its dependencies (first run: about 2 minutes)" -- \
	  $(PY) -m pip install --progress-bar off -c constraints.txt -e '.[dev]'
	@touch $(STAMP)
	@echo "[setup] done: $$($(PY) -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)')"

demo: $(STAMP)
	$(VENV)/bin/v2pe-train $(RECIPE)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/v2pe_positions.py

# The V2PE effect experiment (docs/v2pe.md): trains both effect recipes and evaluates them to 16L.
# About an hour on 2 CPU cores; not part of `make test`. SEED=1 for the second seed.
SEED ?= 0
effect: $(STAMP)
	$(PY) benchmarks/v2pe_effect.py --seed $(SEED) --out runs/effect/seed$(SEED)

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
