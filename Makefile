# Two commands for a fresh machine: `make demo` and `make test`. Each sets up (or refreshes) the local
# virtualenv from the pinned requirements first, then acts.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: setup test test-all demo lint clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --compile -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check sprintjax tests configs launch benchmarks notebooks
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

demo: $(STAMP)
	$(BIN)/sprintjax demo --workdir runs/demo

lint: $(STAMP)
	$(BIN)/ruff check sprintjax tests configs launch benchmarks notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache
