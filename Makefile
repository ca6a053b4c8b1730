# The README's two commands: `make demo` and `make test`. Both set up (or reuse) .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed on a CPU-only machine: pick the CPU accelerator instead of probing for CUDA.
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/codepmp run specs/local_demo.yaml

# `pytest` exits 5 when it collected no test: that is a failure too.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
