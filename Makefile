# GenCLIP Inspect: the commands a newcomer needs.
#   make demo   - install everything, bring up the brokers, run the whole loop (deploy/demo.py)
#   make test   - install everything, run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format demo services-up services-down services-status clean

setup: $(STAMP) brokers

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,opcua,pylon,genicam]'
	@touch $@

.PHONY: brokers
brokers:
	bash deploy/services.sh install

test: setup
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The whole loop: a stand-in PLC (synthetic/plc.py) triggers two synthetic cameras over MQTT -> genclip run ->
# decisions and rejects back to the PLC's reject station, results to a dashboard (Redis); prompts trained midway
# and hot-reloaded; a summary with the PLC's view, precision/recall and latency. ~3 min on 2 cores.
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/genclip config check --config config.toml
	bash deploy/services.sh up
	$(PY) deploy/demo.py $(DEMO_ARGS)

services-up:
	bash deploy/services.sh up
services-down:
	bash deploy/services.sh down
services-status:
	bash deploy/services.sh status

# Before a run on a lent GPU machine: the wheels and broker packages it lacks, into .whl/ (see bench/gpu_check.sh)
.PHONY: gpu-wheels
gpu-wheels:
	bash bench/gpu_wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
