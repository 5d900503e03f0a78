# Quick start (a fresh machine with Python 3.10+):
#   make repro   set up .venv and run the whole pipeline on the embedded default (dvc repro)
#   make test    set up .venv and run the tests (GPU tests are skipped without TensorRT + GPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# PyTorch is pinned to the build this workplace's machines install from local disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup repro test test-fast gpu-test bench mutation ptx clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

repro: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@cat artifacts/compare/compare.md

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not gpu" -q

test-fast: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not gpu and not slow" -q

# Mutation testing of the modules whose answers users act on (docs/mutation.md); not in CI.
#   e.g. make mutation MUTATION_ARGS="--rev HEAD --modules pipeline/gate.py"
mutation: setup
	$(BIN)/python -m pip install -q -e ".[mutation]"
	PATH="$(abspath $(BIN)):$$PATH" nice -n 10 $(BIN)/python bench/mutation.py --jobs 2 --nice 0 --equivalent bench/mutation_equivalent --out bench/results/mutation.json --md bench/results/mutation.md $(MUTATION_ARGS)

# The GPU binning kernels (pipeline/runtime/kernels/binning.cu) as PTX the driver compiles on first use:
# compute_75 (Turing on), PTX ISA lowered to 7.0 (CUDA 11.0 drivers on) after ptxas accepts it. Needs nvcc.
NVCC ?= nvcc
PTXAS ?= $(dir $(shell command -v $(NVCC)))ptxas
ptx: pipeline/runtime/kernels/binning.ptx

pipeline/runtime/kernels/binning.ptx: pipeline/runtime/kernels/binning.cu
	$(NVCC) -ptx -arch=compute_75 -o $@.tmp $<
	sed -i 's/^\.version [0-9.]*$$/.version 7.0/' $@.tmp
	$(PTXAS) -arch=sm_75 -o /dev/null $@.tmp
	mv $@.tmp $@

clean:
	rm -rf $(VENV)
