# Two entry points (see README): `make demo` and `make test`; each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines get the pinned CPU build of torch (a fast install); machines with an NVIDIA
# driver get PyPI's default CUDA build. Override with e.g. `make test TORCH=torch==2.11.0`, or
# TORCH_INDEX=https://download.pytorch.org/whl/cpu on a CPU machine whose pip has no local CPU wheel.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
TORCH_INDEX ?=

.PHONY: setup demo test bench world clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python jobs/caption.py

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python jobs/bench.py

world: setup
	$(BIN)/python jobs/build_demo_world.py

clean:
	rm -rf $(VENV) out
