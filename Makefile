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

# Benchmarks at ci_small size: each prints absolute times, but CI gates only on ratios measured side by
# side in the same run, and on quality floors (benchmarks/baseline.json, benchmarks/compare.py).
BENCH_CI := BENCH_RSS_DOCS=4 BENCH_ROUNDS=1 BENCH_CURATE_ROUNDS=3 BENCH_PROMPTS=8 BENCH_MAX_NEW=64 BENCH_STEPS=3
BENCH_JSON := runs/bench-ci.json

# `pytest` exits 5 when it collected no test: that is a failure too.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=20 tests
	$(MAKE) --no-print-directory bench

bench: setup
	@mkdir -p runs
	$(BENCH_CI) $(PY) -m pytest -q -s benchmarks/bench_*.py --benchmark-json=$(BENCH_JSON)
	$(PY) -m benchmarks.compare $(BENCH_JSON)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
