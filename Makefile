# mixflow — `make test` works on a fresh machine: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mixflow-installed

# make report [DATASET=digits] [PROFILE=default] [DEVICE=cpu] [ARGS="--retrain ..."]
DATASET ?= digits
PROFILE ?= default
DEVICE  ?= cpu

.PHONY: install test bench report lint clean gpu-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with test extras

test: $(STAMP)  ## run the test suite (CPU, offline)
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest

report: $(STAMP)  ## run notebooks/01-04 headlessly: reports/ (executed notebooks; browse reports/index.html), figures/ and the results table
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m mixflow_core report --dataset $(DATASET) --profile $(PROFILE) \
		--device $(DEVICE) $(ARGS)

lint: $(STAMP)  ## ruff on the package, tests, benchmarks and notebooks
	$(BIN)/python -m ruff check mixflow_core tests benchmarks notebooks

bench: $(STAMP)  ## print the log-det estimator benchmark (see benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/logdet_accuracy.py

gpu-data:  ## copy Debian's Fashion-MNIST idx files into data/fashion-mnist/ (ignored; travels to the GPU machine)
	mkdir -p data/fashion-mnist
	cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache reports
