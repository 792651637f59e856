# fastrdrop: `make help` lists the targets.
SHELL      := /bin/bash
PYTHON     ?= python3
VENV       ?= .venv
# torch is installed before the package, so that its torch>=2.4 requirement is already met; the
# Triton whose binaries tests/test_codegen.py checks is pinned with it
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

.PHONY: help install test lint bench codegen gpu-check gpu-short clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with torch, then fastrdrop (editable) and its dev tools

test: $(STAMP)  ## run the tests (without a GPU the Triton kernels run under the interpreter)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## benchmark every provider on this machine; prints the table, writes results
	$(PY) -m benchmarks

codegen: $(STAMP)  ## compile every Triton kernel for sm_80/90/100 and gfx942/950; print resources
	env -u TRITON_INTERPRET TRITON_CACHE_DIR=$$(mktemp -d) $(PY) -m benchmarks.codegen

# On a GPU machine whose Python already has torch and triton (nothing is downloaded there).
gpu-check:  ## install into the current Python, run the tests on CUDA, then the GPU benchmarks
	$(PYTHON) -m pip install --quiet --no-build-isolation --no-deps .
	$(PYTHON) -m pytest -q -p no:cacheprovider
	$(PYTHON) -m benchmarks --preset gpu-quick
	$(PYTHON) -m benchmarks --preset gpu-linear
	$(PYTHON) -m benchmarks

# The kernels' own test files, which run in a few minutes on a GPU
KERNEL_TESTS := tests/test_fused.py tests/test_stacked.py tests/test_inplace.py \
                tests/test_nonfinite.py tests/test_sync.py tests/test_buffers.py
CUT_S        ?= 300

gpu-short:  ## one 10-minute GPU call: the kernel tests (5 minutes at most), then two benchmarks
	$(PYTHON) -m pip install --quiet --no-build-isolation --no-deps .
	@# SIGINT: a cut pytest still prints its summary. A failure fails the target, after the
	@# benchmarks: pytest's exit status, or where the cut made it 124, a FAILED or ERROR line
	set -o pipefail; log=$$(mktemp); rc=0; \
	timeout -s INT $(CUT_S) $(PYTHON) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS) 2>&1 \
	    | tee $$log || rc=$$?; \
	$(PYTHON) -m benchmarks --preset gpu-quick && \
	$(PYTHON) -m benchmarks --tokens 8192 --vocab 32000 262144 --modes fwd+bwd \
	    --providers fastrdrop fastrdrop-stacked fastrdrop-stacked-inplace fastrdrop-pair && \
	{ if [ $$rc -ne 124 ]; then exit $$rc; fi; echo "kernel tests cut at $(CUT_S) s"; \
	  ! grep -Eq '^(FAILED|ERROR) ' $$log; }

clean:  ## remove the virtual environment and build outputs
	rm -rf $(VENV) build .pytest_cache .ruff_cache .hypothesis
