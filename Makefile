# The two set-up commands: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both create .venv from requirements.lock first (pinned, no resolution: pyrender's PyOpenGL pin
# conflicts with the PyOpenGL that OSMesa needs, so the lock is installed with --no-deps).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: venv run test test-fast bench clean-data

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

run: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: venv
	$(BIN)/pytest -q

test-fast: venv
	$(BIN)/pytest -q -m "not slow"

bench: venv
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean-data:
	rm -rf data/sample data/decomposed data/priors data/train data/evaluate
