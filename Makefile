# Every target sets itself up: a .venv with the project and torch==2.13.0 (CPU wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench performance clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The tests need Ray (the cluster tests); `make run` does not.
$(VENV)/.installed-ray: $(STAMP)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

run: $(STAMP)
	rm -rf runs/label-digits
	$(BIN)/zmqgossip run label-digits --out runs/label-digits

# Everything (CI runs this).
test: $(VENV)/.installed-ray
	$(BIN)/python -m pytest -q tests

# The fast tier: tests in this process, with or without sockets (markers: pyproject.toml).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not processes and not slow" tests

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# docs/PERFORMANCE.md from fresh runs of every benchmark (long).
performance: $(STAMP)
	$(BIN)/python benchmarks/performance.py

clean:
	rm -rf $(VENV) runs .pytest_cache
