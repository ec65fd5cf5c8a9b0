# The two set-up commands: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both create .venv from requirements.lock first (pinned, no resolution: pyrender's PyOpenGL pin
# conflicts with the PyOpenGL that OSMesa needs, so the lock is installed with --no-deps).
# The Debian packages the project needs are in system-packages.txt (`make system-packages`, as root).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := $(shell sed 's/\#.*//' system-packages.txt)
export DVC_NO_ANALYTICS := 1

.PHONY: venv run run-long test test-fast bench clean-data system-packages check-system-packages

$(VENV)/.installed: requirements.lock pyproject.toml system-packages.txt
	@$(MAKE) -s check-system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

system-packages:
	apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES)

# Where dpkg is (Debian, Ubuntu): name every missing package before anything is built.
check-system-packages:
	@command -v dpkg-query >/dev/null || exit 0; missing=""; \
	for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f '$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "missing Debian packages:$$missing; as root: apt-get update && make system-packages" >&2; exit 1; fi

# `pics repro` is `dvc repro` with one Prefect server for every stage (each would start its own).
run: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pics repro

# The longer profile (about 45 min on 2 cores, README): three times the images, 15 times the steps, a
# cosine schedule. It runs as the DVC experiment "long" in a temporary copy (the workspace and its
# data/ are left alone): `dvc exp show` lists its metrics; `dvc exp apply long && dvc checkout`
# brings its outputs (data/evaluate/report/) into the workspace.
LONG_PROFILE := make_sample.num_images=480 train.steps=3000 train.lr_schedule=cosine
run-long: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pics pipeline --name long $(foreach s,$(LONG_PROFILE),--set $(s))

test: venv
	$(BIN)/pytest -q

test-fast: venv
	$(BIN)/pytest -q -m "not slow"

bench: venv
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean-data:
	rm -rf data/sample data/decomposed data/priors data/train data/evaluate
