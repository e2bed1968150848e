"""Shared fixtures. CUDA cases carry ``@pytest.mark.gpu`` (via ``DEVICES``) and are skipped when
no GPU is visible or moeyard was built without its CUDA kernels; ``pytest -m gpu`` runs only them."""
import zlib

import pytest
import torch

import moeyard

HAS_CUDA_KERNELS = torch.cuda.is_available() and moeyard.build_info()["cuda_compiled"]

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a GPU and moeyard's CUDA kernels")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA_KERNELS:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh but reproducible seed per test: the test's id picks it."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def zipf_experts(T, k, E, device="cpu", s=1.2):
    """[T,k] int32 routing with Zipf-skewed expert popularity and distinct experts per token."""
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    idx = torch.multinomial(p.expand(T, E), k, replacement=False)
    return idx.to(torch.int32).to(device)


def random_experts(T, k, E, device="cpu", p_none=0.0):
    """[T,k] int32 routing with distinct experts per token; each slot -1 with probability p_none."""
    ex = torch.rand(T, E).argsort(dim=1)[:, :k].to(torch.int32)
    if p_none > 0:
        ex = ex.masked_fill(torch.rand(T, k) < p_none, -1)
    return ex.to(device)
