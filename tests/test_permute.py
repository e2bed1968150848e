"""permute / unpermute: kernels vs reference.py in every dtype, gradients, opcheck, bad input."""
import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, random_experts

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _setup(T, k, E, d, capacity, dtype, device, p_none=0.1):
    experts = random_experts(T, k, E, device, p_none)
    p = moeyard.plan(experts, E, capacity)
    x = torch.randn(T, d, device=device).to(dtype)
    w = torch.rand(T, k, device=device)
    return p, x, w


SHAPES = [(0, 2, 4, 8, None), (1, 1, 1, 1, None), (37, 2, 8, 13, None), (200, 4, 16, 64, 30),
          (300, 8, 64, 256, None), (100, 2, 4, 40, 10)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("T,k,E,d,capacity", SHAPES)
def test_permute_unpermute_match_reference(device, dtype, T, k, E, d, capacity):
    p, x, w = _setup(T, k, E, d, capacity, dtype, device)
    xp = moeyard.permute(x, p)
    torch.testing.assert_close(xp, ref.permute(x, p.row_source, p.token_row), rtol=0, atol=0)
    y = torch.randn(p.num_rows, d, device=device).to(dtype)
    for weights in (None, w):
        out = moeyard.unpermute(y, p, weights)
        want = ref.unpermute(y, p.row_source, p.token_row, weights)
        assert out.dtype == dtype
        torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_roundtrip_is_identity_when_nothing_dropped(device):
    p, x, _ = _setup(64, 4, 8, 32, None, torch.float32, device, p_none=0.0)
    w = torch.full((64, 4), 0.25, device=device)
    torch.testing.assert_close(moeyard.unpermute(moeyard.permute(x, p), p, w), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_backward_matches_reference(device, dtype):
    p, _, w = _setup(50, 3, 8, 24, 12, torch.float32, device)
    y = torch.randn(p.num_rows, 24, device=device).to(dtype).requires_grad_()
    w.requires_grad_()
    g = torch.randn(50, 24, device=device).to(dtype)
    got = torch.autograd.grad(moeyard.unpermute(y, p, w), (y, w), g)
    want = torch.autograd.grad(ref.unpermute(y, p.row_source, p.token_row, w), (y, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def test_gradcheck():
    p, x, w = _setup(12, 3, 5, 6, None, torch.float64, "cpu")
    x.requires_grad_()
    w = w.double().requires_grad_()
    y = torch.randn(p.num_rows, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moeyard.permute(x, p), (x,))
    assert torch.autograd.gradcheck(lambda y, w: moeyard.unpermute(y, p, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: moeyard.unpermute(y, p), (y,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    p, x, w = _setup(20, 2, 4, 8, 7, torch.float32, device)
    y = torch.randn(p.num_rows, 8, device=device)
    for rg in (False, True):
        xr, yr, wr = (t.clone().requires_grad_(rg) for t in (x, y, w))
        torch.library.opcheck(torch.ops.moeyard.permute.default, (xr, p.row_source, p.token_row))
        torch.library.opcheck(torch.ops.moeyard.unpermute.default,
                              (yr, p.row_source, p.token_row, wr))
        torch.library.opcheck(torch.ops.moeyard.unpermute.default,
                              (yr, p.row_source, p.token_row, None))
    g = torch.randn(20, 8, device=device)
    for weights, need_w in ((w, True), (w, False), (None, False)):
        torch.library.opcheck(torch.ops.moeyard.unpermute_backward.default,
                              (g, y, p.row_source, p.token_row, weights, need_w))


def _bad_plan():
    return moeyard.plan(torch.zeros(4, 2, dtype=torch.int32), 2)


@pytest.mark.parametrize("fn,msg", [
    (lambda: moeyard.permute(torch.randn(5, 3), _bad_plan()), "token"),
    (lambda: moeyard.permute(torch.randn(4), _bad_plan()), "2 dimensions"),
    (lambda: moeyard.unpermute(torch.randn(7, 3), _bad_plan()), "row"),
    (lambda: moeyard.unpermute(torch.randn(8, 3), _bad_plan(), torch.rand(4, 3)), "weights"),
    (lambda: torch.ops.moeyard.permute(torch.randn(4, 3), torch.tensor([0, 99] * 4, dtype=torch.int32),
                                       _bad_plan().token_row), "row_source"),
])
def test_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()
