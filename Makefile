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
# side in the same run, and on quality floors and memory ceilings (benchmarks/baseline.json, benchmarks/compare.py).
BENCH_CI := BENCH_RSS_DOCS=4 BENCH_ROUNDS=1 BENCH_CURATE_ROUNDS=3 BENCH_PROMPTS=8 BENCH_MAX_NEW=64 BENCH_STEPS=3
# Gated on throughput ratios: one suite at a time, nothing else running.
BENCH_SPEED := benchmarks/bench_curate.py benchmarks/bench_generate.py benchmarks/bench_train.py benchmarks/bench_bon.py

# `pytest` exits 5 when it collected no test: that is a failure too.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 tests
	$(MAKE) --no-print-directory bench

# The quality floor (bench_pipeline) and the memory ceilings (bench_memory) measure no speed: the two run side by
# side, one OpenMP thread each (tests/conftest.py says why), then the speed suites run alone.
bench: setup
	@mkdir -p runs
	$(BENCH_CI) OMP_NUM_THREADS=1 $(PY) -m pytest -q -s benchmarks/bench_pipeline.py \
		--benchmark-json=runs/bench-pipeline.json > runs/bench-pipeline.log 2>&1 & pipeline=$$!; \
	$(BENCH_CI) OMP_NUM_THREADS=1 $(PY) -m pytest -q -s benchmarks/bench_memory.py \
		--benchmark-json=runs/bench-memory.json; memory=$$?; \
	wait $$pipeline; pipeline=$$?; cat runs/bench-pipeline.log; test $$memory -eq 0 && test $$pipeline -eq 0
	$(BENCH_CI) $(PY) -m pytest -q -s $(BENCH_SPEED) --benchmark-json=runs/bench-speed.json
	$(PY) -m benchmarks.compare runs/bench-pipeline.json runs/bench-memory.json runs/bench-speed.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
