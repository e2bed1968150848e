# The two commands of the README, each doing its whole set-up on a fresh machine:
#   make demo   install everything, build moeyard, run the main job (python -m moeyard demo)
#   make test   install everything, build moeyard, run the test suite (what CI runs), and the
#               transformers integration's tests once more on the oldest supported transformers
# PYTHON, MAX_JOBS, TORCH_CUDA_ARCH_LIST, MOEYARD_CPU_ONLY are passed through to the build.
PYTHON ?= python3
# torch 2.11 from PyPI is a CUDA 13.0 build: its CUDA major must match nvcc's (13) for the CUDA
# kernels to compile. With no nvcc, or a CPU-only torch, moeyard builds its CPU kernels only.
TORCH_SPEC ?= torch==2.11.*

.PHONY: deps install demo test test-hf-oldest gpu
deps:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" numpy pytest scipy ninja "setuptools>=70" wheel \
		tqdm matplotlib nbclient nbformat ipykernel "transformers>=5.17" "accelerate>=1.1"

install: deps
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m moeyard info
	$(PYTHON) -m moeyard demo

test: install
	$(PYTHON) -m pytest -q
	$(MAKE) test-hf-oldest

# tests/test_hf.py again on the oldest transformers moeyard.hf supports (SUPPORTED_TRANSFORMERS in
# python/moeyard/hf.py; the main run has the newest), in a venv over the installed packages
# (after `make install`).
test-hf-oldest:
	$(PYTHON) -m venv --system-site-packages build/hf-oldest
	build/hf-oldest/bin/python -m pip install -q "transformers==5.17.*"
	build/hf-oldest/bin/python -m pytest -q tests/test_hf.py

# On a GPU machine (no network, torch preinstalled): the one-call check (load or build, expert
# correctness, GPU tests, compute-sanitizer, the expert benchmark, a short table).
gpu:
	$(PYTHON) benchmarks/gpu_check.py
