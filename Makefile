# Two-command quick start: `make demo` and `make test`. Both create .venv when it is
# missing and reinstall only when requirements or pyproject.toml change.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Extra pip arguments for torch alone, e.g. a CPU-only index on a machine without a GPU.
TORCH_PIP_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-all lint install install-dev bench clean

demo: $(VENV)/.installed
	$(BIN)/robustcaps evaluate --attack bim $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check robustcaps tests
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check robustcaps tests

bench: $(VENV)/.installed
	$(BIN)/robustcaps bench all

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "robustcaps needs Python >= 3.10")'
	$(PY) -m venv $(VENV)

# torch goes first and alone, pinned by constraints.txt, so that no later requirement can
# pull in a different (CUDA) build; torchattacks goes without its torchvision requirement.
$(VENV)/.installed: $(BIN)/python requirements.txt constraints.txt pyproject.toml
	$(PIP) install -q -c constraints.txt $(TORCH_PIP_ARGS) torch
	grep -v -e '^torchattacks' requirements.txt > $(VENV)/requirements-base.txt
	$(PIP) install -q -c constraints.txt -r $(VENV)/requirements-base.txt
	$(PIP) install -q -c constraints.txt --no-deps "$$(grep -e '^torchattacks' requirements.txt)" -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	@touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
