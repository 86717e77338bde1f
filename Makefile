# make run   : set everything up, then train the quickstart model (CONFIG=... to train another)
# make test  : set everything up, then run the test suite
# make bench : set everything up, then measure the layers, test-time episodes and training (results/bench_*)
# Everything installs into the project's virtual environment .venv (created when missing, from BASE_PYTHON,
# default python3); PYTHON=/path/to/python installs into and runs with that interpreter instead.
PYTHON ?= .venv/bin/python
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
	$(PYTHON) scripts/bench_layers.py
	$(PYTHON) scripts/bench_episodes.py
	$(PYTHON) scripts/bench_training.py
