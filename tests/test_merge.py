"""merged_linear (SMEAR's merged expert): kernel vs reference.py over shapes, chunkings, weight
memory orders, dtypes and biases; gradients of all four inputs; gradcheck; the spec's oracles
(one-hot probs, linearity); bad input; opcheck; torch.compile."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, DEVICE_DTYPES

# Inputs O(1), weights scaled by 1/sqrt(K): outputs O(1). Low precision: the merged weight and the
# output are each rounded once (the reference rounds the merged weight the same way), and the
# kernel's merge GEMM reads probs rounded to the input dtype.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 3e-3}


# B, S, K, E, N
SHAPES = {
    "B0": (0, 5, 8, 3, 4),
    "S0": (3, 0, 8, 3, 4),
    "E1": (4, 7, 16, 1, 12),
    "1x1x1": (1, 1, 1, 1, 1),
    "odd": (5, 7, 13, 3, 11),
    "K0": (7, 9, 0, 2, 5),
    "N0": (3, 4, 6, 2, 0),
    "E8-S33": (6, 33, 40, 8, 24),
}


def shape_cases(names, chunked):
    """(B, S, K, E, N, chunks) params: every named shape in one chunk, plus the (name, chunking)
    pairs of ``chunked``."""
    cases = [(n, "one") for n in names] + chunked
    return [pytest.param(*SHAPES[n], c, id=f"{n}-{c}") for n, c in cases]


CHUNKED = [("odd", "two"), ("odd", "each"), ("E8-S33", "two"), ("E1", "each")]
FWD_CASES = shape_cases(list(SHAPES), CHUNKED)
GRAD_CASES = shape_cases(["B0", "S0", "E1", "odd", "E8-S33"], CHUNKED)


@contextlib.contextmanager
def merge_budget(nbytes):
    old = moeyard.ops._set_merge_budget(nbytes)
    try:
        yield
    finally:
        moeyard.ops._set_merge_budget(old)


def chunking(mode, N, K, dtype):
    """Budget context for a chunking mode: "one" (the default: one chunk at these sizes),
    "two" (two examples per chunk, the last one shorter for odd B), "each" (one example per chunk:
    budget 0)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if mode == "one":
        return contextlib.nullcontext()
    return merge_budget(2 * N * K * itemsize if mode == "two" else 0)


CHUNKINGS = ["one", "two", "each"]


def inputs(B, S, K, E, N, dtype, device, order="nk", bias=True, dirichlet=False):
    """(x, probs, weight, bias): weight logical [E, N, K], contiguous ("nk") or the transpose of an
    [E, K, N]-contiguous tensor ("kn")."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(B, S, K, device=device).to(dtype)
    probs = torch.softmax(2 * torch.randn(B, E, device=device, dtype=acc), dim=-1)
    scale = 1 / math.sqrt(max(K, 1))
    if order == "nk":
        weight = (scale * torch.randn(E, N, K, device=device)).to(dtype)
    else:
        weight = (scale * torch.randn(E, K, N, device=device)).to(dtype).transpose(1, 2)
    b = (0.5 * torch.randn(E, N, device=device)).to(dtype) if bias else None
    return x, probs, weight, b


def assert_close(got, want, tol, scaled=False):
    assert got.dtype == want.dtype and got.shape == want.shape
    atol = tol * max(want.abs().max().item(), 1e-30) if scaled and want.numel() else tol
    torch.testing.assert_close(got, want, rtol=tol, atol=atol)


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,S,K,E,N,chunks", FWD_CASES)
@pytest.mark.parametrize("order", ["nk", "kn"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference(device, dtype, B, S, K, E, N, order, bias, chunks):
    x, probs, weight, b = inputs(B, S, K, E, N, dtype, device, order, bias)
    assert order == "nk" or min(N, K) <= 1 or not weight.is_contiguous()
    with chunking(chunks, N, K, dtype):
        y = moeyard.merged_linear(x, probs, weight, b)
    assert y.shape == (B, S, N) and y.dtype == dtype and y.device == x.device
    assert_close(y, ref.merged_linear(x, probs, weight, b), TOL[dtype], scaled=dtype != torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """x as a slice, a weight whose strides are neither memory order (copied), a transposed bias:
    same values as contiguous copies."""
    B, S, K, E, N = 4, 6, 10, 3, 7
    x = torch.randn(B, S, K + 3, device=device)[:, :, 2:2 + K]
    probs = torch.softmax(torch.randn(E, B, device=device), 0).t()
    weight = torch.randn(E, N, 2 * K, device=device)[:, :, ::2]
    b = torch.randn(N, E, device=device).t()
    assert not any(t.is_contiguous() for t in (x, probs, weight, b))
    want = moeyard.merged_linear(*(t.contiguous() for t in (x, probs, weight, b)))
    torch.testing.assert_close(moeyard.merged_linear(x, probs, weight, b), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks", ["one", "each"])
def test_bias_is_rounded_once_with_the_output(device, dtype, chunks):
    """y = round(x @ Wbar^T + probs @ bias) with the sum in fp32, as the reference: on inputs
    where every step but that last rounding is exact (small integers, dyadic probs, biases with
    all of the dtype's significant bits) kernel and reference agree bit for bit, and rounding the
    merged bias to the dtype first (a second rounding) gives a different output."""
    B, S, K, E, N = 4, 16, 8, 4, 32
    bits = 1 - int(math.log2(torch.finfo(dtype).eps))  # significant bits: 8 (bf16), 11 (fp16)
    x = torch.randint(-1, 2, (B, S, K), device=device).to(dtype)
    weight = torch.randint(-2, 3, (E, N, K), device=device).to(dtype)
    dyadic = torch.tensor([0.5, 0.25, 0.125, 0.125], device=device)
    probs = dyadic[torch.rand(B, E, device=device).argsort(dim=1)]  # exact in every dtype
    bias = (torch.randint(1 - 2**bits, 2**bits, (E, N), device=device) * 2.0 ** (1 - bits))
    bias = bias.to(dtype)  # exact: integers below 2^bits times a power of two
    with chunking(chunks, N, K, dtype):
        y = moeyard.merged_linear(x, probs, weight, bias)
    want = ref.merged_linear(x, probs, weight, bias)
    assert torch.equal(y, want)
    # the inputs tell the two roundings apart: the merged bias needs more bits than the dtype has
    product = torch.einsum("bsk,bnk->bsn", x.float(),
                           torch.einsum("be,enk->bnk", probs, weight.float()))  # exact in fp32
    bbar = probs @ bias.float()  # exact in fp32
    rounded_twice = (product + bbar.to(dtype).float()[:, None, :]).to(dtype)
    assert not torch.equal(rounded_twice, want)


# ---------------------------------------------------------------------------------- gradients


def grads_of(fn, leaves, g):
    out = fn(*leaves)
    if not out.requires_grad:  # e.g. an empty reference graph
        return tuple(torch.zeros_like(t) for t in leaves)
    return torch.autograd.grad(out, leaves, g, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,S,K,E,N,chunks", GRAD_CASES)
@pytest.mark.parametrize("order", ["nk", "kn"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_grads_match_reference(device, dtype, B, S, K, E, N, order, bias, chunks):
    """Gradients of x, probs, weight and bias match the reference's autograd; weight's and bias's
    gradients keep their memory order."""
    x, probs, weight, b = inputs(B, S, K, E, N, dtype, device, order, bias)
    leaves = [t.requires_grad_() for t in (x, probs, weight, b) if t is not None]
    g = torch.randn(B, S, N, device=device).to(dtype)
    with chunking(chunks, N, K, dtype):
        got = grads_of(moeyard.merged_linear, leaves, g)
    want = grads_of(ref.merged_linear, leaves, g)
    for leaf, a, w in zip(leaves, got, want):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        if leaf is weight or leaf is b:
            assert a.stride() == leaf.stride()
        assert_close(a, w, GRAD_TOL[dtype], scaled=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (False, True, True, False)],
                         ids=["x", "probs", "weight", "bias", "probs+weight"])
def test_one_sided_grads(device, need):
    """Asking for a subset of the gradients gives the values of asking for all of them."""
    x, probs, weight, b = inputs(5, 6, 12, 4, 9, torch.float32, device, "kn")
    leaves = [x, probs, weight, b]
    g = torch.randn(5, 6, 9, device=device)
    all_grads = grads_of(moeyard.merged_linear, [t.clone().requires_grad_() for t in leaves], g)
    for t, n in zip(leaves, need):
        t.requires_grad_(n)
    asked = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(moeyard.merged_linear(x, probs, weight, b), asked, g)
    for a, w in zip(got, [w for w, n in zip(all_grads, need) if n]):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("order,bias,chunks", [("nk", True, "one"), ("kn", True, "two"),
                                               ("kn", False, "one"), ("nk", False, "each")])
def test_gradcheck(order, bias, chunks):
    x, probs, weight, b = inputs(3, 2, 4, 3, 3, torch.float64, "cpu", order, bias)
    leaves = tuple(t.requires_grad_() for t in (x, probs, weight, b) if t is not None)
    with chunking(chunks, 3, 4, torch.float64):
        assert torch.autograd.gradcheck(lambda *a: moeyard.merged_linear(*a), leaves)


# ------------------------------------------------------------------------------------ oracles


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("order", ["nk", "kn"])
def test_one_hot_probs_is_that_experts_linear(device, dtype, order):
    """One-hot probs (ALGORITHMS.md 3.6): example b gets exactly expert e_b's linear layer."""
    B, S, K, E, N = 6, 5, 24, 4, 16
    x, _, weight, b = inputs(B, S, K, E, N, dtype, device, order)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    chosen = torch.tensor([0, 3, 1, 1, 2, 3], device=device)
    probs = F.one_hot(chosen, E).to(acc)
    y = moeyard.merged_linear(x, probs, weight, b)
    for i in range(B):
        want = F.linear(x[i].to(acc), weight[chosen[i]].to(acc), b[chosen[i]].to(acc))
        assert_close(y[i], want.to(dtype), TOL[dtype], scaled=dtype != torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_linearity_oracle(device, chunks):
    """With an identity activation SMEAR is the probability-weighted sum of the expert outputs
    (ALGORITHMS.md 3.6), here in fp64 against each expert's own nn.Linear."""
    B, S, K, E, N = 5, 8, 12, 4, 10
    x, probs, weight, b = inputs(B, S, K, E, N, torch.float32, device, "kn")
    with chunking(chunks, N, K, torch.float32):
        y = moeyard.merged_linear(x, probs, weight, b)
    outs = torch.stack([F.linear(x.double(), weight[e].double(), b[e].double())
                        for e in range(E)])  # [E, B, S, N]
    want = torch.einsum("be,ebsn->bsn", probs.double(), outs)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_equals_unchunked(device):
    """Every chunking gives the one-chunk result (fp32, up to rounding) in output and gradients."""
    B, S, K, E, N = 7, 5, 9, 3, 6
    x, probs, weight, b = inputs(B, S, K, E, N, torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, probs, weight, b)]
    g = torch.randn(B, S, N, device=device)
    runs = []
    for mode in CHUNKINGS:
        with chunking(mode, N, K, torch.float32):
            y = moeyard.merged_linear(*leaves)
            runs.append((y, *torch.autograd.grad(y, leaves, g)))
    for run in runs[1:]:
        for a, w in zip(run, runs[0]):
            torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device):
    x, probs, weight, b = inputs(6, 10, 32, 4, 24, torch.bfloat16, device, "kn")
    leaves = [t.requires_grad_() for t in (x, probs, weight, b)]

    def run():
        y = moeyard.merged_linear(*leaves)
        return (y, *torch.autograd.grad(y.float().square().sum(), leaves))

    for u, v in zip(run(), run()):
        assert torch.equal(u, v)


def test_budget_knob():
    old = moeyard.ops._set_merge_budget(1234)
    assert old == 256 << 20
    assert moeyard.ops._set_merge_budget(old) == 1234
    with pytest.raises(RuntimeError, match="budget must be >= 0"):
        moeyard.ops._set_merge_budget(-1)


# ---------------------------------------------------------------------------------- bad input


def _call(**kw):
    """A valid call (B=2, S=3, K=4, E=3, N=5) with the given arguments replaced."""
    args = dict(x=torch.randn(2, 3, 4), probs=torch.softmax(torch.randn(2, 3), -1),
                weight=torch.randn(3, 5, 4), bias=torch.randn(3, 5))
    args.update(kw)
    return lambda: moeyard.merged_linear(*args.values())


BAD = {
    "x-rank": (_call(x=torch.randn(6, 4)), "x must have 3 dimensions"),
    "probs-rank": (_call(probs=torch.rand(2, 3, 1)), "probs must have 2 dimensions"),
    "weight-rank": (_call(weight=torch.randn(5, 4)), "weight must have 3 dimensions"),
    "K": (_call(weight=torch.randn(3, 5, 6)), r"x \[B, S, K\] has K = 4 but weight .* K = 6"),
    "E": (_call(probs=torch.rand(2, 4)), r"probs must be \[B, E\] with E = 3 .* got \[2, 4\]"),
    "B": (_call(probs=torch.rand(5, 3)), r"probs must be \[B, E\] with B = 2 .* got \[5, 3\]"),
    "E0": (_call(weight=torch.randn(0, 5, 4), probs=torch.rand(2, 0), bias=None),
           "at least one expert"),
    "probs-bf16": (_call(x=torch.randn(2, 3, 4).bfloat16(), weight=torch.randn(3, 5, 4).bfloat16(),
                         probs=torch.rand(2, 3).bfloat16(), bias=None), "probs must be Float"),
    "probs-fp64-for-fp32-x": (_call(probs=torch.rand(2, 3).double()), "probs must be Float"),
    "x-int": (_call(x=torch.ones(2, 3, 4, dtype=torch.long)), "floating-point"),
    "weight-dtype": (_call(weight=torch.randn(3, 5, 4).double()), "weight must have x's dtype"),
    "bias-shape": (_call(bias=torch.randn(3, 6)), r"bias must be \[E, N\] = \[3, 5\], got \[3, 6\]"),
    "bias-rank": (_call(bias=torch.randn(15)), r"bias must be \[E, N\]"),
    "bias-dtype": (_call(bias=torch.randn(3, 5).half()), "bias must have x's dtype"),
}


@pytest.mark.parametrize("fn,msg", [pytest.param(f, m, id=i) for i, (f, m) in BAD.items()])
def test_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


def test_backward_op_bad_grad():
    x, probs, weight, b = inputs(2, 3, 4, 3, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"grad must be \[B, S, N\] = \[2, 3, 5\]"):
        torch.ops.moeyard._merged_linear_backward(torch.randn(2, 3, 4), x, probs, weight, b,
                                                  [True] * 4)


@pytest.mark.gpu
def test_bad_devices():
    x, probs, weight, b = inputs(2, 3, 4, 3, 5, torch.float32, "cuda")
    cases = [
        (lambda: moeyard.merged_linear(x, probs.cpu(), weight, b), "probs .* same device"),
        (lambda: moeyard.merged_linear(x, probs, weight.cpu(), b), "weight .* same device"),
        (lambda: moeyard.merged_linear(x, probs, weight, b.cpu()), "bias .* same device"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


# ------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order,chunks", [("nk", "one"), ("kn", "each")])
def test_opcheck(device, order, chunks):
    ops = torch.ops.moeyard
    x, probs, weight, b = inputs(3, 4, 6, 3, 5, torch.float32, device, order)
    with chunking(chunks, 5, 6, torch.float32):
        for rg in (False, True):
            for bias in (b, None):
                args = [t.clone().requires_grad_(rg) if t is not None else None
                        for t in (x, probs, weight, bias)]
                if order == "kn":
                    args[2] = weight.detach().transpose(1, 2).clone().transpose(1, 2) \
                        .requires_grad_(rg)
                torch.library.opcheck(ops.merged_linear.default, tuple(args))
        g = torch.randn(3, 4, 5, device=device)
        for mask in ([True] * 4, [True, False, False, True], [False, True, True, False]):
            for bias in (b, None):
                torch.library.opcheck(ops._merged_linear_backward.default,
                                      (g, x, probs, weight, bias, mask))


# ------------------------------------------------------------------------- SMEAR's experts


@pytest.mark.parametrize("device,dtype", [p for p in DEVICE_DTYPES if p.values[1] != torch.float16])
@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS))
def test_merged_experts_every_activation(activation, device, dtype):
    """MergedExperts (SMEAR's experts) take every activation of the table: merged_linear, the
    reference's activation in fp32 (fp64 for fp64) rounded to x's dtype, merged_linear. Output
    and the gradients of x, probs and every parameter match that composition of the reference."""
    B, S, D, I, E = 3, 5, 8, 6, 4
    ex = moeyard.MergedExperts(E, D, I, activation, bias=True, initializer_range=0.3,
                               device=device, dtype=dtype)
    with torch.no_grad():
        ex.gate_up_proj_bias.normal_(std=0.3), ex.down_proj_bias.normal_(std=0.3)
    assert ex.gate_up_proj.shape[1] == (2 * I if ref.is_gated(activation) else I)
    x, probs, _, _ = inputs(B, S, D, E, I, dtype, device)
    leaves = [x.requires_grad_(), probs.requires_grad_(), *ex.parameters()]
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def reference(x, probs):
        h = ref.merged_linear(x, probs, ex.gate_up_proj, ex.gate_up_proj_bias)
        a = ref.activation(h.to(acc), activation).to(dtype)
        return ref.merged_linear(a, probs, ex.down_proj, ex.down_proj_bias)

    out, want = ex(x, probs), reference(x, probs)
    assert out.dtype == dtype
    assert_close(out, want, TOL[dtype], scaled=True)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, leaves, g)
    for a, b in zip(got_grads, torch.autograd.grad(want, leaves, g)):
        assert_close(a, b, GRAD_TOL[dtype], scaled=True)


# ------------------------------------------------------------------------------ torch.compile


def tiny_smear(x, probs, w1, b1, w2, b2):
    """Two merged linears around a GELU: the compute of a SMEAR MLP."""
    h = moeyard.merged_linear(x, probs, w1, b1)
    return moeyard.merged_linear(F.gelu(h), probs, w2, b2)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    B, S, D, H, E = 3, 5, 8, 12, 4
    x, probs, w1, b1 = inputs(B, S, D, E, H, torch.float32, device, "kn")
    _, _, w2, b2 = inputs(B, S, H, E, D, torch.float32, device)

    def fwd_bwd(fn, leaves):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(*leaves)
        return (y, *torch.autograd.grad(y.square().sum(), leaves))

    leaves = [x, probs, w1, b1, w2, b2]
    eager = fwd_bwd(tiny_smear, leaves)
    compiled = torch.compile(tiny_smear, fullgraph=True, backend="aot_eager")
    got = fwd_bwd(compiled, leaves)
    for a, w in zip(got, eager):
        torch.testing.assert_close(a, w)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fwd_bwd(compiled, [torch.randn_like(x), torch.softmax(torch.randn_like(probs), -1),
                           *leaves[2:]])
