# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup lock demo test test-fast lint clean device-check

setup: $(STAMP)

# Installs exactly the versions in requirements.lock, then the project itself (editable) without
# letting pip pick anything else. The offline `--no-index` pass fails if pyproject.toml asks for a
# distribution (core or dev) that the lock lacks or pins too low: run `make lock` after changing
# dependencies. `pip check` then fails on any inconsistency among the installed versions.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-index 'remote-pipeline[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

# Regenerates requirements.lock with uv (kept in its own venv) for the reference platform, x86_64
# Linux and CPython 3.11.7; override LOCK_PYTHON / LOCK_PLATFORM (uv's --python-platform) for another.
# Existing pins are kept where they still fit; `make lock UV_FLAGS=--upgrade` moves everything to the
# newest allowed versions.
LOCK_VENV ?= .venv-lock
LOCK_PYTHON ?= 3.11.7
LOCK_PLATFORM ?= x86_64-manylinux_2_28
UV_FLAGS ?=
lock:
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/python -m pip install -q 'uv>=0.5'; }
	$(LOCK_VENV)/bin/uv pip compile --quiet $(UV_FLAGS) --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) pyproject.toml --extra dev -c constraints.txt -o requirements.lock

# The 6-seed standard deviation of the embedded default's test micro-F1 (README, Results).
SEED_SPREAD := 0.008

demo: setup
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro
	@echo "Your run (workspace) beside the committed one (HEAD):"
	@$(BIN)/dvc metrics diff HEAD --all --precision 4 --targets metrics/test.json
	@echo "Expected: no change on the CPU kind that made the committed run (Intel Xeon, family 6 model 207; README, Results)."
	@echo "Elsewhere a run differs like a new seed: micro_f1 within about 0.02 of HEAD (6-seed std $(SEED_SPREAD)),"
	@echo "per pair kind within about 0.04 (6-seed std up to 0.021)."

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not pipeline"

# The GPU check (python -m bench.device): on a CUDA machine, one command of under 8 minutes that
# writes its figures to DEVICE_REPORT; commit it under bench/results/ with the machine named.
# `.venv/bin/python -m bench.device --smoke` runs the same code at tiny sizes on a CPU.
DEVICE_REPORT ?= bench/results/device-report.json
device-check: setup
	$(BIN)/python -m bench.device --out $(DEVICE_REPORT)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache
