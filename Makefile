# `make test` on a fresh machine: creates .venv, installs the pinned dependencies (torch 2.13.0 CPU here),
# builds flux_engine._C (editable install) and runs the test suite.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
NATIVE_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
TORCH_PREFIX = $(shell $(VPY) -c 'import torch; print(torch.utils.cmake_prefix_path)')

.PHONY: demo test install bench nvcc-check cmake-check install-check ci clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(VPY)
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(NATIVE_SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Federated fine-tuning on CPU: 4 clients, one BIG-bench domain each, tune the SmolLM2 MoE preset with Flux for 3
# rounds; prints held-out accuracy per round, writes bench/results/demo.csv and demo.png (bench/results/demo.md).
demo: install
	$(VPY) -m flux_engine.cli demo

test: install
	$(VPY) -m pytest

bench: install
	$(VPY) -m pytest bench --benchmark-only --benchmark-enable

# Every CUDA kernel compiles for sm_80 and sm_90, with no GPU and no CUDA build of torch needed.
nvcc-check:
	bash scripts/nvcc_check.sh

# The same csrc built against libtorch with CMake, and its C++ tests.
cmake-check: $(VENV)/.deps
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

# A regular (non-editable) install in a separate environment: the extension imports and the Triton
# kernels live only under flux_engine.triton_kernels.
install-check: $(VENV)/.deps
	bash scripts/install_check.sh $(VPY)

ci: test nvcc-check cmake-check install-check

clean:
	rm -rf build dist *.egg-info flux_engine/_C*.so $(VENV)
