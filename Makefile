# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BASE   := $(VENV)/.installed-base
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Re-installs only when pyproject.toml changes. --no-compile: only the modules a process imports get
# byte-compiled, when first imported (`make test` lets that bytecode be written, see below), not all
# 17,000 .py files of torch, transformers and the rest (measured on a fresh venv here: 107 s -> 43 s).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e '.[dev,convert]'
	touch $(STAMP)

# The demo needs only the library (no torch, diffusers or pytest).
$(BASE): pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e .
	touch $(BASE)

install: $(STAMP)

# The suite starts ~25 Python processes (two xdist workers, the CLI and multi-host subprocesses), each
# importing jax, flax, orbax (and torch, diffusers in the workers): with bytecode writing off in the
# environment (PYTHONDONTWRITEBYTECODE) and none written at install, every one compiled those modules from
# source again (11 s instead of 5.6 s for the jax stack, 13 s instead of 5 s for torch + diffusers, here).
# Writing it lets the first import of each module compile it for all the others.
test: install
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadgroup --durations=20 $(PYTEST_ARGS)

demo: $(BASE)
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
