# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The 3-seed standard deviation of test micro-F1 of the embedded default (README, Results).
SEED_SPREAD := 0.007

demo: setup
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro
	@echo "Your run (Value) beside the committed one (HEAD):"
	@$(BIN)/dvc metrics diff HEAD --all --precision 4 --targets metrics/test.json
	@echo "Expected: the same to 4 decimals on the CPU kind that made the committed run (README, Results);"
	@echo "elsewhere micro_f1 within about 2 x $(SEED_SPREAD) (its 3-seed std) of HEAD."

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not pipeline"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
