# Two commands: `make demo` and `make test`. Each bootstraps .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 satisfies the torch>=2.8 range without a CUDA download.
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.8,<3"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedimg demo --out demo_out

# Fast, CI-sized suite (everything but the long demo-quality run).
test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q -n 4 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q

# What .pre-commit-config.yaml runs, as checks only (nothing rewritten).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_dicom.py --out bench_out/dicom.json
	$(PY) benchmarks/bench_preprocess.py --out bench_out/preprocess.json
	$(PY) benchmarks/bench_training.py --out bench_out/training.json
	$(PY) benchmarks/bench_quality.py --seeds 0,1 --out bench_out/quality.json
	$(PY) benchmarks/bench_exchange.py --out bench_out/exchange.json
	$(PY) benchmarks/bench_robustness.py --out bench_out/robustness.json
	$(PY) benchmarks/bench_privacy.py --out bench_out/privacy.json

clean:
	rm -rf demo_out workspace bench_out .pytest_cache
