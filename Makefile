# make run   : set everything up, then train the quickstart model (CONFIG=... to train another)
# make test  : set everything up, then run the test suite
PYTHON ?= python3
CONFIG ?= configs/quickstart.yaml
export PYTHON

.PHONY: setup run test bench
setup:
	@bash scripts/setup.sh

run: setup
	$(PYTHON) -m ttt_meta fit --config $(CONFIG)

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) scripts/bench.py
