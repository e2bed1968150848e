# The two commands of the README, each doing its whole set-up on a fresh machine:
#   make demo   install everything, build moeyard, run the main job (python -m moeyard demo)
#   make test   install everything, build moeyard, run the test suite (what CI runs)
# PYTHON, MAX_JOBS, TORCH_CUDA_ARCH_LIST, MOEYARD_CPU_ONLY are passed through to the build.
PYTHON ?= python3
# torch 2.11 from PyPI is a CUDA 13.0 build: its CUDA major must match nvcc's (13) for the CUDA
# kernels to compile. With no nvcc, or a CPU-only torch, moeyard builds its CPU kernels only.
TORCH_SPEC ?= torch==2.11.*

.PHONY: deps install demo test gpu
deps:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" numpy pytest scipy ninja "setuptools>=70" wheel \
		tqdm matplotlib nbclient nbformat ipykernel "transformers>=5.17,<5.24" "accelerate>=1.1"

install: deps
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m moeyard info
	$(PYTHON) -m moeyard demo

test: install
	$(PYTHON) -m pytest -q

# On a GPU machine (no network, torch preinstalled): the one-call check (load or build, expert
# correctness, GPU tests, compute-sanitizer, the expert benchmark, a short table).
gpu:
	$(PYTHON) benchmarks/gpu_check.py
