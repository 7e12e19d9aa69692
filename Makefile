# Two commands do all the set-up on a fresh machine:
#   make search   # the main job: a real search on the built-in digits task
#   make test     # the default test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup search test test-slow lint bench

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on this machine; a bare `torch` pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $@

# A new run directory each time (runs/digits-DATE-TIME); `autoprune show` it afterwards.
search: setup
	$(BIN)/autoprune search --task digits --budget "latency<0.3ms" --trials 40 \
		--finetune-steps 40 --output runs/digits-$(shell date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check autoprune tests benchmarks examples
