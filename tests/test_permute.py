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


# DeepSeek-V3 routes k = 8 of its experts with hidden size d = 7168: from T = 37,450 tokens the
# permuted buffer has more than 2^31 elements (T*k*d). The kernels index in int64; only the row ids
# (R, T*k: the plan maps hold them in int32) are limited to int32.
DSV3_T, DSV3_K, DSV3_D = 37_450, 8, 7168


def _maps(T, k, R, bad_row_source=False, bad_token_row=False):
    """Plan maps [R] and [T, k], all -1 but one entry out of range: the CPU kernels check the
    maps' values right after the shapes and before they allocate anything, so a call that gets
    that error has passed every shape check without touching the data."""
    row_source = torch.full((R,), -1, dtype=torch.int32)
    token_row = torch.full((T, k), -1, dtype=torch.int32)
    if bad_row_source:
        row_source[0] = -2
    if bad_token_row:
        token_row[0, 0] = R
    return row_source, token_row


def test_hidden_size_products_beyond_int32_pass_the_checks():
    """R*d and T*d beyond 2^31 are no error. No gigabytes: the data tensors come from
    torch.empty (pages never touched, never read) and each call stops at a plan entry that is
    out of range, after the shape checks."""
    T, k, d = DSV3_T, DSV3_K, DSV3_D
    assert T * k * d >= 2**31
    x = torch.empty(T, d, dtype=torch.bfloat16)  # 0.5 GiB of address space, never touched
    with pytest.raises(RuntimeError, match=r"row_source\[0\] = -2 is out of range"):
        torch.ops.moeyard.permute(x, *_maps(T, k, T * k, bad_row_source=True))
    # unpermute's output has T*d elements: 2^31 and more with one slot per token
    T1 = T * k
    assert T1 * d >= 2**31
    y = torch.empty(4, d, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"token_row\[0, 0\] = 4 is out of range"):
        torch.ops.moeyard.unpermute(y, *_maps(T1, 1, 4, bad_token_row=True))


def test_row_ids_beyond_int32_are_refused():
    """What the int32 plan maps cannot hold stays an error: R >= 2^31 rows, T*k >= 2^31
    assignments. Zero-stride views of one element: nothing is allocated."""
    i32 = dict(dtype=torch.int32)
    x = torch.empty(0, 2)
    with pytest.raises(RuntimeError, match="R = 2147483648 overflows int32"):
        torch.ops.moeyard.permute(x, torch.empty(1, **i32).expand(2**31),
                                  torch.empty(0, 1, **i32))
    with pytest.raises(RuntimeError, match=r"T\*k = 2147483648 overflows int32"):
        torch.ops.moeyard.permute(x, torch.empty(0, **i32),
                                  torch.empty(1, 1, **i32).expand(2**30, 2))


@pytest.mark.gpu
def test_deepseek_v3_shapes_roundtrip_cuda():
    """permute and unpermute at T*k*d > 2^31 elements on the GPU (4.4 GB of bf16 rows): the
    weighted round trip with weights 1/k gives x back exactly, and the last rows are in place."""
    T, k, d = DSV3_T, DSV3_K, DSV3_D
    experts = torch.arange(T * k, device="cuda").view(T, k).remainder(256).int()
    p = moeyard.plan(experts, 256)
    x = torch.randn(T, d, device="cuda").bfloat16()
    xp = moeyard.permute(x, p)
    assert xp.shape == (T * k, d)
    last = p.row_source[-1].long()
    assert torch.equal(xp[-1], x[last // k])
    out = moeyard.unpermute(xp, p, torch.full((T, k), 1 / k, device="cuda"))
    assert torch.equal(out, x)
