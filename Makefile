# Two entry points: `make demo` and `make test`. Each creates/updates the virtual environment first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch lies on this project's machines' disk; an unpinned torch may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo test train-default clean-cache

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/lmmlab demo

test: venv
	$(PY) -m pytest -q

train-default: venv
	$(VENV)/bin/lmmlab train-default
