# mixflow — `make test` works on a fresh machine: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mixflow-installed

.PHONY: install test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with test extras

test: $(STAMP)  ## run the test suite (CPU, offline)
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest

bench: $(STAMP)  ## print the log-det estimator benchmark (see benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/logdet_accuracy.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
