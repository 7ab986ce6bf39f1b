# clipmill: `make demo` runs the whole pipeline on the synthetic crawl; `make test` runs the tests.
# Both create .venv first (or refresh it when requirements.lock or pyproject.toml changed).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.clipmill-setup
SITE    = $(VENV)/lib/python3.11/site-packages

export PREFECT_HOME ?= $(CURDIR)/.prefect
export NO_ALBUMENTATIONS_UPDATE = 1
export HF_HUB_OFFLINE = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DO_NOT_TRACK = 1

.PHONY: setup demo golden test test-fast lint bench mlflow-ui prefect-ui clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

setup: $(STAMP)  ## create .venv with the pinned dependencies (requirements.lock)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" wheel setuptools
	# The lock is complete, so no resolver run: exactly the tested versions, nothing else.
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# img2dataset pins the `dataclasses` backport, whose dataclasses.py shadows the standard library.
	rm -rf $(SITE)/dataclasses.py $(SITE)/dataclasses-*.dist-info $(SITE)/__pycache__/dataclasses.*
	$(BIN)/python -c "import dataclasses, sys; assert dataclasses.__file__.startswith(sys.base_prefix), dataclasses.__file__"
	touch $(STAMP)

demo: setup  ## run the full pipeline on the synthetic web crawl (Prefect flow over dvc.yaml)
	$(BIN)/clipmill run demo

golden: setup  ## after `make demo`: record its outputs' file listings beside dvc.lock (commit both)
	$(BIN)/python -m tests.golden write

test: setup lint  ## run the test suite (it reproduces the demo in a fresh clone against the golden dvc.lock)
	$(BIN)/python -m pytest -q

lint: setup  ## ruff (configured in pyproject.toml)
	$(BIN)/ruff check .

test-fast: setup  ## the tests without the slow end-to-end ones
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup  ## throughput benchmarks, reported as ratios against the bare libraries
	$(BIN)/python -m benchmarks

mlflow-ui: setup  ## browse runs and the model registry on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: setup  ## browse flow runs on http://127.0.0.1:4200
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

clean:  ## remove pipeline outputs, tracking databases and reports (keeps .venv)
	rm -rf data/* reports/* mlflow.db mlruns mlartifacts .prefect
	touch data/.gitkeep reports/.gitkeep
