# Two entry points for a fresh machine (Python 3.10+, a C compiler and cmake for the native tests):
#   make demo   set up .venv and run the main job on its embedded default
#   make test   set up .venv and run the whole test suite (what CI runs, through .ci/run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	touch $@

demo: setup
	$(BIN)/python -m randmask demo

test: setup
	$(BIN)/python -m pytest -q tests
