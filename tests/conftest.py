"""Shared fixtures. CUDA cases carry ``@pytest.mark.gpu`` (via ``DEVICES``) and are skipped when
no GPU is visible or moeyard was built without its CUDA kernels; ``pytest -m gpu`` runs only them."""
import zlib
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import reference as ref

HAS_CUDA_KERNELS = torch.cuda.is_available() and moeyard.build_info()["cuda_compiled"]

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# Every (device, dtype) pair the expert kernels serve: fp64 on CPU only.
DEVICE_DTYPES = [
    pytest.param(d.values[0], dt, id=f"{d.id}-{str(dt).removeprefix('torch.')}", marks=d.marks)
    for d in DEVICES
    for dt in (torch.float32, torch.bfloat16, torch.float16)
    + ((torch.float64,) if d.values[0] == "cpu" else ())
]


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


def expert_out(ex, e, rows):
    """Expert e of an experts module on ``rows``, one nn.Linear at a time in fp32: the naive
    layers' expert (reference activation, optional biases)."""
    b1 = None if ex.gate_up_proj_bias is None else ex.gate_up_proj_bias[e].float()
    b2 = None if ex.down_proj_bias is None else ex.down_proj_bias[e].float()
    a = ref.activation(F.linear(rows.float(), ex.gate_up_proj[e].float(), b1), ex.activation)
    return F.linear(a, ex.down_proj[e].float(), b2)


def fwd_bwd(fn, layer, x, grad_out):
    """Output, aux losses and gradients of (x, every parameter) for loss = <out, g> + aux, where
    ``fn(x) -> (out, aux_losses dict)`` runs a layer (or a naive reference of it)."""
    x = x.detach().clone().requires_grad_()
    out, losses = fn(x)
    total = (out.float() * grad_out).sum() + sum(losses.values(), torch.zeros((), device=x.device))
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)
    return out.detach(), {n: v.detach() for n, v in losses.items()}, grads


def close(got, want, tol, scaled=False):
    """assert_close with rtol = tol and atol = tol, or tol times the largest |want| (scaled)."""
    atol = tol * max(want.abs().max().item(), 1e-30) if scaled else tol
    torch.testing.assert_close(got, want, rtol=tol, atol=atol)


def run_layer(layer):
    """``fn(x) -> (layer(x), layer.aux_losses)`` for :func:`fwd_bwd`."""
    return lambda x: (layer(x), layer.aux_losses)


# A layer against its naive reference: the output (scaled below fp32) and the gradients (scaled)
LAYER_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
LAYER_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def check_layer_against(layer, naive, x, grad_out, router_grad_tol=None):
    """A layer agrees with ``naive(x) -> (out, aux_losses, stats)`` on the output
    (``LAYER_TOL[x.dtype]``; scaled below fp32), the aux losses (1e-5), the gradients of x and
    every parameter (``LAYER_GRAD_TOL[x.dtype]``, scaled; ``router.*`` parameters router_grad_tol
    if given) and ``last_stats`` (1e-6)."""
    tol, grad_tol = LAYER_TOL[x.dtype], LAYER_GRAD_TOL[x.dtype]
    out, losses, grads = fwd_bwd(run_layer(layer), layer, x, grad_out)
    want_out, want_losses, want_grads = fwd_bwd(lambda v: naive(v)[:2], layer, x, grad_out)
    assert out.shape == x.shape and out.dtype == x.dtype
    close(out.float(), want_out.float(), tol, scaled=x.dtype != torch.float32)
    assert losses.keys() == want_losses.keys()
    for n in losses:
        close(losses[n], want_losses[n], 1e-5)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads, want_grads):
        t = router_grad_tol if router_grad_tol and name.startswith("router.") else grad_tol
        close(got.float(), want.float(), t, scaled=True)
    want_stats = naive(x)[2]
    assert layer.last_stats.keys() == want_stats.keys()
    for n, v in layer.last_stats.items():
        close(v.float().cpu(), want_stats[n].float().cpu(), 1e-6)


@contextmanager
def host_reads():
    """Records every Python-level read of a tensor's value on the host (what would synchronize
    with the device on CUDA), by name, in the yielded list; the reads still happen."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    seen = []

    def recording(name):
        def f(*a, **k):
            seen.append(name)
            return saved[name](*a, **k)
        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, recording(n))
        yield seen
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
