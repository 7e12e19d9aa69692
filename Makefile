# Two commands do all the set-up on a fresh machine:
#   make search   # the main job: a real search on the built-in digits task
#   make test     # the default test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup search test test-slow test-cluster lint bench-docs bench-docs-check wheel-check

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on this machine; a bare `torch` pulls a CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $@

# A new run directory each time (runs/digits-DATE-TIME); `autoprune show` it afterwards.
# --verify 2: the recommended plan and the uniform one, fully fine-tuned, compared at the end.
search: setup
	$(BIN)/autoprune search --task digits --budget "latency<20%" --trials 40 \
		--finetune-steps 40 --verify 2 --output runs/digits-$(shell date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# A search across two hosts that share no files (network + mount namespaces on this machine;
# needs root), with the worker node's raylet killed mid-search: tests/cluster/two_hosts.py.
test-cluster: setup
	$(BIN)/python -m pytest -q -s -m slow tests/search/test_two_hosts.py

# The measured numbers in README.md and docs/ (bench_docs.DOCS), rendered from benchmarks/results/
# (the check fails when a doc differs from what its results files render).
bench-docs: setup
	$(BIN)/python benchmarks/bench_docs.py

bench-docs-check: setup
	$(BIN)/python benchmarks/bench_docs.py --check

lint: setup
	$(BIN)/ruff check autoprune tests benchmarks examples

# The package as users install it: the wheel, built and installed into a new virtual
# environment (torch==2.13.0 first; pip's cache is reused), runs a 2-trial search outside the
# source tree, then its deployment plan and HTML report. build/lib is removed first:
# setuptools would ship stale modules left in it.
WHEEL_CHECK := build/wheel-check
wheel-check: setup
	rm -rf $(WHEEL_CHECK) build/lib build/bdist.*
	$(BIN)/pip wheel -q --no-deps -w $(WHEEL_CHECK) .
	$(PY) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/pip install -q --no-compile torch==2.13.0
	$(WHEEL_CHECK)/venv/bin/pip install -q --no-compile "$$(echo $(WHEEL_CHECK)/*.whl)[report]"
	bin=$(CURDIR)/$(WHEEL_CHECK)/venv/bin; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	cd "$$dir" && unset PYTHONPATH && $$bin/autoprune --version && \
	$$bin/autoprune search --task digits --trials 2 --finetune-steps 5 --output run --quiet && \
	$$bin/autoprune plan run > /dev/null && $$bin/autoprune report run
