# Two commands on a fresh machine (Python >= 3.11):
#   make demo   - create .venv, install, train an SNN online on embedded data, dump graph + plot
#   make test   - create .venv, install, run the test suite
#   make long-delay - an adaptive-LIF RSNN remembers a cue over 500 steps, trained online
PY ?= python3
VENV := .venv
# test processes (pytest-xdist; one file per worker at a time, so module fixtures run once):
# 2 fits the CI machine (2 cores); each worker holds up to ~4 GB
WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean long-delay

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,demo,brainpy]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --out outputs/demo

long-delay: $(STAMP)
	$(BIN)/python examples/long_delay.py --out outputs/long-delay

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
