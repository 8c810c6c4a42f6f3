# Two entry points: `make demo` (the main job on the bundled default models) and
# `make test` (the whole suite, real zoo models included). Both build .venv first.
#
# torch: the CPU build 2.13.0 (on these machines it installs from local disk in
# seconds; an unpinned torch would pull a multi-GB CUDA build). On a GPU machine:
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" test
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xferlens demo

test: $(STAMP)
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check xferlens tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
