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

# The 6-seed standard deviation of the embedded default's test micro-F1 (README, Results).
SEED_SPREAD := 0.005

demo: setup
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro
	@echo "Your run (workspace) beside the committed one (HEAD):"
	@$(BIN)/dvc metrics diff HEAD --all --precision 4 --targets metrics/test.json
	@echo "Expected: no change on the CPU kind that made the committed run (AMD EPYC, AVX2; README, Results)."
	@echo "Elsewhere a run differs like a new seed: micro_f1 within about 0.01 of HEAD (6-seed std $(SEED_SPREAD)),"
	@echo "per pair kind within about 0.03 (6-seed std up to 0.016)."

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not pipeline"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
