# hostbus: `make run` starts the broker, `make test` runs every check. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck pytest bench schema clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hostbus needs Python 3.11 or newer; set PYTHON=python3.11")'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed; on Debian or Ubuntu install it with 'apt-get install python3-venv' and run make again" >&2; exit 1; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

## run: start hostbusd in the foreground with the default configuration (ARGS="..." adds flags)
run: $(STAMP)
	$(BIN)/hostbusd $(ARGS)

## test: ruff, mypy, then the whole pytest suite
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check broker clients tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: the benchmarks (not part of `make test`): socket 1 -> 1, FIFO ingress
bench: $(STAMP)
	$(BIN)/python bench/pubsub_1to1.py
	$(BIN)/python bench/fifo_publish.py

## schema: regenerate config/hostbus.schema.json from the configuration models
schema: $(STAMP)
	$(BIN)/hostbusd --print-schema > config/hostbus.schema.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
