"""grouped_mm and expert_ffn on both backends (moeyard's kernel, torch's grouped GEMM): kernels vs
reference.py in every dtype and layout, gradients, gradcheck, opcheck, torch.compile, CUDA graphs
(forward and backward), the backend choice and bad input."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, DEVICE_DTYPES, random_experts, zipf_experts

# Inputs are O(1) and weights scaled by 1/sqrt(K), so products are O(1) and one absolute tolerance
# serves every K (fp32 sums over K drift by ~eps * sqrt(K), far below 1e-5 here). Low-precision
# outputs may differ from the reference by one ulp: up to 2^-7 (bf16), 2^-10 (fp16) relative.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}
# Gradients (sums over rows and over the expert MLP's width) are compared with an absolute
# tolerance of GRAD_TOL times the largest reference gradient.
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}


I32 = torch.int32
BACKENDS = ["moeyard", "grouped_mm"]


# ----------------------------------------------------------------------------------- helpers


def assert_close(got, want, tol, scaled=False):
    """|got - want| <= tol * |want| + atol, atol = tol (data are O(1)) or, ``scaled``, tol times the
    largest |want| (for gradients and low-precision sums, whose error follows their magnitude)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    atol = tol * max(want.abs().max().item(), 1e-30) if scaled and want.numel() else tol
    torch.testing.assert_close(got, want, rtol=tol, atol=atol)


def grads(out, inputs, grad):
    """torch.autograd.grad, with zeros for inputs the output does not reach (the reference builds no
    graph at all when no row is used, e.g. R = 0)."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(out, inputs, grad, allow_unused=True, materialize_grads=True)


def offsets_of(counts, device="cpu"):
    """[E+1] int32 exclusive cumsum of per-expert row counts, first 0."""
    z = torch.zeros(1, dtype=torch.long)
    return torch.cat([z, counts.long().cumsum(0)]).to(I32).to(device)


def random_counts(R, E, load):
    """Rows per expert summing to R: "random" (sorted random cuts, some experts may be empty),
    "one" (a single expert holds every row) or "zipf" (skewed, most experts nearly empty)."""
    if load == "one":
        counts = torch.zeros(E, dtype=torch.long)
        counts[torch.randint(E, ())] = R
        return counts
    if load == "zipf":
        if R == 0:
            return torch.zeros(E, dtype=torch.long)
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
        return torch.bincount(torch.multinomial(p, R, replacement=True), minlength=E)
    cuts = torch.randint(0, R + 1, (E - 1,)).sort().values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([R])]))


def weights_3d(E, K, N, order, dtype, device):
    """Logical [E, K, N] b scaled so a @ b is O(1): row-major ("kn") or the transpose of an
    nn.Linear-style contiguous [E, N, K] ("nk")."""
    scale = 1 / math.sqrt(max(K, 1))
    if order == "kn":
        return (scale * torch.randn(E, K, N, device=device)).to(dtype)
    return (scale * torch.randn(E, N, K, device=device)).to(dtype).transpose(1, 2)


def gmm_inputs(R, E, K, N, load, mode, order, dtype, device):
    """(a, b, offsets, a_index, capacity) for grouped_mm with about R rows.

    modes: "plain" (a [R,K], no a_index), "gathered" (a_index with repeats and -1 into a smaller
    a), "capacity" (R = E*C rows at fixed stride, a read directly), "plan" / "plan_capacity"
    (offsets and a_index from moeyard.plan of a routing with -1 slots, as expert_ffn uses them)."""
    b = weights_3d(E, K, N, order, dtype, device)
    if mode in ("plain", "gathered"):
        offsets = offsets_of(random_counts(R, E, load), device)
        if mode == "plain":
            return torch.randn(R, K, device=device).to(dtype), b, offsets, None, None
        A = R // 2 + 3
        a_index = torch.randint(0, A, (R,), device=device, dtype=I32)
        a_index[torch.rand(R, device=device) < 0.1] = -1
        return torch.randn(A, K, device=device).to(dtype), b, offsets, a_index, None
    if mode == "capacity":
        C = math.ceil(R / E)
        counts = random_counts(R, E, load).clamp(max=C)
        return (torch.randn(E * C, K, device=device).to(dtype), b, offsets_of(counts, device),
                None, C)
    k = min(2, E)
    T = math.ceil(R / k)
    if load == "one":
        experts = torch.full((T, k), -1, dtype=I32, device=device)
        experts[:, 0] = torch.randint(E, ()).item()
    elif load == "zipf":
        experts = zipf_experts(T, k, E, device)
    else:
        experts = random_experts(T, k, E, device, p_none=0.2)
    C = moeyard.expert_capacity(T, E, k, 0.9, 1) if mode == "plan_capacity" else None
    p = moeyard.plan(experts, E, C)
    a_index = torch.where(p.row_source >= 0, p.row_source // k, -1).to(I32)
    return torch.randn(T, K, device=device).to(dtype), b, p.offsets, a_index, C


def refused(backend, device, dtype, capacity, widths, call):
    """True, after checking that ``call()`` raises the backend's refusal, where ``backend`` cannot
    compute these products; False where it can (then the test goes on)."""
    if backend == "grouped_mm" and not ref.grouped_mm_serves(device, dtype, capacity, widths):
        with pytest.raises(RuntimeError, match="backend 'grouped_mm' .*cannot compute"):
            call()
        return True
    return False


def unused_rows(offsets, capacity, R):
    """Bool [R]: rows no expert owns (their output must be exactly zero)."""
    return ~ref.expert_rows(offsets, capacity, R)[1]


GMM_SHAPES = [  # R, E, K, N, load
    pytest.param(0, 3, 16, 8, "random", id="R0"),
    pytest.param(1, 1, 1, 1, "random", id="1x1x1"),
    pytest.param(37, 1, 40, 24, "random", id="E1-K40-N24"),
    pytest.param(45, 4, 13, 7, "random", id="odd-K13-N7"),
    pytest.param(64, 6, 40, 24, "one", id="one-expert-holds-all"),
    pytest.param(150, 16, 64, 130, "zipf", id="zipf-empty-experts"),
    pytest.param(200, 8, 136, 72, "random", id="K136-N72"),
    pytest.param(1500, 32, 264, 200, "zipf", id="large-zipf"),
]
GMM_MODES = ["plain", "gathered", "capacity", "plan", "plan_capacity"]


def ffn_setup(T, k, E, H, I, activation, dtype, device, *, capacity=None, p_none=0.0,
              zipf=False, bias=False, layout="linear"):
    """Routing, plan and expert parameters for expert_ffn: (x, plan, weights, params) with
    params = (gate_up, down, gate_up_bias, down_bias) as the wrapper takes them in ``layout``
    (contiguous; :func:`logical` gives the reference's views)."""
    N1 = 2 * I if ref.is_gated(activation) else I
    experts = zipf_experts(T, k, E, device) if zipf else random_experts(T, k, E, device, p_none)
    p = moeyard.plan(experts, E, capacity)
    x = torch.randn(T, H, device=device).to(dtype)
    weights = torch.rand(T, k, device=device)
    if layout == "linear":  # nn.Linear order: gate_up [E, N1, H], down [E, H, I]
        gate_up = torch.randn(E, N1, H, device=device) / math.sqrt(H)
        down = torch.randn(E, H, I, device=device) / math.sqrt(I)
    else:  # GPT-OSS order: gate_up [E, H, N1], down [E, I, H]
        gate_up = torch.randn(E, H, N1, device=device) / math.sqrt(H)
        down = torch.randn(E, I, H, device=device) / math.sqrt(I)
    gate_up, down = gate_up.to(dtype), down.to(dtype)
    b1 = (0.5 * torch.randn(E, N1, device=device)).to(dtype) if bias else None
    b2 = (0.5 * torch.randn(E, H, device=device)).to(dtype) if bias else None
    return x, p, weights, (gate_up, down, b1, b2)


def logical(gate_up, down, layout):
    """The logical w1 [E,H,N1], w2 [E,I,H] that reference.expert_ffn takes."""
    if layout == "matmul":
        return gate_up, down
    return gate_up.transpose(1, 2), down.transpose(1, 2)


def ffn_ref(x, p, weights, gate_up, down, b1, b2, activation, layout, backend="moeyard"):
    """reference.expert_ffn with the numerics of ``backend`` (see its round_first_product)."""
    w1, w2 = logical(gate_up, down, layout)
    return ref.expert_ffn(x, p.row_source, p.token_row, p.offsets, p.capacity, weights, w1, w2,
                          b1, b2, activation, round_first_product=backend == "grouped_mm")


def ffn(x, p, weights, gate_up, down, b1, b2, activation, layout, backend="auto"):
    return moeyard.expert_ffn(x, p, weights, gate_up, down, b1, b2, activation, layout,
                              backend=backend)


def ffn_widths(H, I, activation):
    """Row widths of expert_ffn's products: H, N1 and I."""
    return (H, 2 * I if ref.is_gated(activation) else I, I)


# Plans for expert_ffn: (T, k, E, H, I, capacity, p_none, zipf).
FFN_PLANS = [
    pytest.param(33, 2, 8, 40, 24, None, 0.0, False, id="dropless"),
    pytest.param(41, 3, 6, 24, 20, None, 0.3, False, id="none-slots"),
    pytest.param(50, 2, 4, 32, 16, 18, 0.1, False, id="capacity-drops"),
    pytest.param(64, 2, 16, 16, 8, None, 0.0, True, id="zipf"),
    pytest.param(29, 1, 5, 13, 7, None, 0.0, False, id="k1-odd"),
    pytest.param(12, 4, 4, 16, 8, None, 0.0, False, id="k=E"),
    pytest.param(10, 1, 1, 8, 12, 6, 0.0, False, id="E1-capacity"),
    pytest.param(300, 4, 16, 72, 56, None, 0.0, True, id="large-zipf"),
    pytest.param(0, 2, 4, 8, 8, None, 0.0, False, id="T0"),
    pytest.param(0, 2, 4, 8, 8, 3, 0.0, False, id="T0-capacity"),
]
GRAD_PLANS = ("none-slots", "capacity-drops", "E1-capacity", "T0", "T0-capacity")
LAYOUT_BIAS = [pytest.param(l, b, id=f"{l}-{'bias' if b else 'nobias'}")
               for l in ("linear", "matmul") for b in (False, True)]
# The activations that run the whole plan x layout x dtype matrix: every gating (none, halves,
# GPT-OSS pairs), relu's kink, erf; test_expert_ffn_every_activation runs all of them on a smaller
# matrix, test_elementwise_functions each function against torch's own.
MATRIX_ACTIVATIONS = ("none", "gelu", "relu", "swiglu", "geglu", "swiglu_oss")


# ------------------------------------------------------------------------- grouped_mm forward


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("R,E,K,N,load", GMM_SHAPES)
@pytest.mark.parametrize("mode", GMM_MODES)
@pytest.mark.parametrize("order", ["kn", "nk"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_matches_reference(backend, device, dtype, R, E, K, N, load, mode, order):
    """Every layout and load matches the reference; rows no expert owns are exactly zero."""
    a, b, offsets, a_index, C = gmm_inputs(R, E, K, N, load, mode, order, dtype, device)
    call = lambda: moeyard.grouped_mm(a, b, offsets, a_index, C, backend=backend)  # noqa: E731
    if refused(backend, device, dtype, C, (K, N), call):
        return
    out = call()
    want = ref.grouped_mm(a, b, offsets, a_index, C)
    assert out.shape == want.shape and out.device == a.device
    assert_close(out, want, TOL[dtype])
    unused = unused_rows(offsets, C, out.shape[0]).to(device)
    assert (out[unused] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["capacity", "plan", "plan_capacity"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_unused_rows_ignore_nan(backend, device, mode):
    """Rows no expert owns are zero even when the a rows they would read hold NaN, and a NaN in an
    unread row of a never reaches the output."""
    a, b, offsets, a_index, C = gmm_inputs(90, 6, 24, 16, "random", mode, "kn", torch.float32,
                                           device)
    R = a.shape[0] if a_index is None else a_index.shape[0]
    unused = unused_rows(offsets, C, R).to(device)
    if a_index is None:
        a[unused] = float("nan")
    else:
        read = torch.zeros(a.shape[0], dtype=torch.bool, device=device)
        used_idx = a_index[~unused]
        read[used_idx[used_idx >= 0].long()] = True
        a[~read] = float("nan")
    assert unused.any()
    call = lambda: moeyard.grouped_mm(a, b, offsets, a_index, C, backend=backend)  # noqa: E731
    if refused(backend, device, torch.float32, C, (24, 16), call):
        return
    out = call()
    assert (out[unused] == 0).all()
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref.grouped_mm(a.nan_to_num(), b, offsets, a_index, C))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_strided_views(backend, device, dtype):
    """a as a column slice (row stride > K) and b as a slice of a wider weight are still read
    correctly (copied or not)."""
    R, E, K, N = 60, 5, 24, 40
    offsets = offsets_of(random_counts(R, E, "random"), device)
    a = torch.randn(R, K + 8, device=device).to(dtype)[:, 4:4 + K]
    for b in ((torch.randn(E, K, N + 16, device=device) / 5).to(dtype)[:, :, :N],
              (torch.randn(E, N + 16, K, device=device) / 5).to(dtype)[:, 8:8 + N].transpose(1, 2)):
        assert not b.is_contiguous() and not b.transpose(1, 2).is_contiguous()
        call = lambda: moeyard.grouped_mm(a, b, offsets, backend=backend)  # noqa: E731
        if not refused(backend, device, dtype, None, (K, N), call):
            assert_close(call(), ref.grouped_mm(a, b, offsets), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_index_all_minus_one(backend, device):
    """An a_index of only -1 reads zero rows, also from an empty a (A = 0), forward and backward."""
    a = torch.randn(0, 8, device=device, requires_grad=True)
    b = torch.randn(3, 8, 4, device=device, requires_grad=True)
    offsets = offsets_of(torch.tensor([2, 0, 3]), device)
    index = torch.full((6,), -1, dtype=I32, device=device)
    call = lambda: moeyard.grouped_mm(a, b, offsets, index, backend=backend)  # noqa: E731
    if refused(backend, device, torch.float32, None, (8, 4), call):
        return
    out = call()
    assert out.shape == (6, 4) and (out == 0).all()
    ga, gb = torch.autograd.grad(out, (a, b), torch.randn_like(out))
    assert ga.shape == a.shape and (gb == 0).all()


# ----------------------------------------------------------------------- grouped_mm gradients


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("R,E,K,N,load", [GMM_SHAPES[i] for i in (0, 3, 4, 5)])
@pytest.mark.parametrize("mode", GMM_MODES)
@pytest.mark.parametrize("order", ["kn", "nk"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_grads_match_reference(backend, device, dtype, R, E, K, N, load, mode, order):
    """grad_a and grad_b match the reference's autograd; grad_b has b's strides."""
    a, b, offsets, a_index, C = gmm_inputs(R, E, K, N, load, mode, order, dtype, device)
    a.requires_grad_()
    b.requires_grad_()
    R_out = a.shape[0] if a_index is None else a_index.shape[0]
    g = torch.randn(R_out, N, device=device).to(dtype)
    call = lambda: moeyard.grouped_mm(a, b, offsets, a_index, C, backend=backend)  # noqa: E731
    if refused(backend, device, dtype, C, (K, N), call):
        return
    got = torch.autograd.grad(call(), (a, b), g)
    want = grads(ref.grouped_mm(a, b, offsets, a_index, C), (a, b), g)
    assert got[1].stride() == b.stride()
    for x, y in zip(got, want):
        assert_close(x, y, GRAD_TOL[dtype], scaled=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_a,need_b", [(True, False), (False, True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_one_sided_grads(backend, device, need_a, need_b):
    """Asking for only grad_a or only grad_b gives the same values as asking for both."""
    a, b, offsets, a_index, C = gmm_inputs(70, 5, 24, 16, "random", "gathered", "nk",
                                           torch.float32, device)
    a.requires_grad_(need_a)
    b.requires_grad_(need_b)
    g = torch.randn(a_index.shape[0], 16, device=device)
    inp = a if need_a else b
    call = lambda: moeyard.grouped_mm(a, b, offsets, a_index, C, backend=backend)  # noqa: E731
    if refused(backend, device, torch.float32, C, (24, 16), call):
        return
    got = torch.autograd.grad(call(), inp, g)[0]
    want = grads(ref.grouped_mm(a, b, offsets, a_index, C), (inp,), g)[0]
    assert_close(got, want, GRAD_TOL[torch.float32], scaled=True)


@pytest.mark.parametrize("mode", GMM_MODES)
@pytest.mark.parametrize("order", ["kn", "nk"])
def test_grouped_mm_gradcheck(mode, order):
    """fp64 gradcheck of the backward formulas (moeyard's backend: torch's grouped GEMM has no
    float64; its gradients are held to the reference's autograd in fp32 above)."""
    a, b, offsets, a_index, C = gmm_inputs(14, 3, 5, 4, "random", mode, order, torch.float64,
                                           "cpu")
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: moeyard.grouped_mm(a, b, offsets, a_index, C, backend="moeyard"), (a, b))


# ------------------------------------------------------------------------------ activations

# Each elementwise function of the activation table as torch's modules write it (relu2 and
# quick_gelu as transformers' ReLUSquaredActivation and QuickGELUActivation): the oracle, kept
# apart from reference.ELEMENTWISE on purpose.
TORCH_FUNCTIONS = dict(identity=torch.nn.Identity(), silu=torch.nn.SiLU(), gelu=torch.nn.GELU(),
                       gelu_tanh=torch.nn.GELU(approximate="tanh"), relu=torch.nn.ReLU(),
                       relu2=lambda v: F.relu(v) ** 2,
                       quick_gelu=lambda v: v * torch.sigmoid(1.702 * v))


def test_activation_tables_agree_and_refuse_unknown_names():
    """The C++ table (moeyard::_activations) and reference.ACTIVATIONS list the same names in the
    same order; activation_name and is_gated read the table; an unknown name is refused with a
    message naming the known ones by the CPU kernel, the fake (meta) kernel, the modules and the
    reference."""
    assert torch.ops.moeyard._activations() == list(ref.ACTIVATIONS) == list(moeyard.ACTIVATIONS)
    assert {a.fn for a in ref.ACTIVATIONS.values()} == set(ref.ELEMENTWISE) == set(TORCH_FUNCTIONS)
    for name, a in ref.ACTIVATIONS.items():
        assert ref.is_gated(name) == (a.gate is not None)
        if a.gate != "oss":
            assert ref.activation_name(a.fn, a.gate == "halves") == name
    assert ref.ACTIVATIONS["swiglu_oss"].gate == "oss"
    with pytest.raises(ValueError, match="gated .* function 'identity'"):
        ref.activation_name("identity", True)
    with pytest.raises(ValueError, match="'tanh'"):
        ref.activation_name("tanh", False)

    known = ", ".join(f"'{n}'" for n in ref.ACTIVATIONS)
    msg = re.escape(f"activation must be one of {known}, got 'swish'")
    with pytest.raises(RuntimeError, match=msg):
        _ffn("swish")()
    x, p, weights, (gu, dn, _, _) = ffn_setup(10, 2, 4, 8, 8, "gelu", torch.float32, "cpu")
    meta = [t.to("meta") for t in (x, p.row_source, p.token_row, p.offsets)]
    w1, w2 = (t.to("meta").transpose(1, 2) for t in (gu, dn))
    args = (*meta, None, weights.to("meta"), w1, w2, None, None)
    assert torch.ops.moeyard.expert_ffn(*args, "gelu").shape == x.shape
    with pytest.raises(Exception, match=msg):
        torch.ops.moeyard.expert_ffn(*args, "swish")
    with FakeTensorMode():
        assert torch.ops.moeyard._activations() == list(ref.ACTIVATIONS)
    with pytest.raises(ValueError, match=msg):
        moeyard.Experts(4, 8, 8, activation="swish")
    with pytest.raises(ValueError, match=msg):
        ref.activation(torch.zeros(2, 4), "swish")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), pytest.param(
    "cuda", torch.float32, marks=pytest.mark.gpu)], ids=["cpu-float64", "cuda-float32"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("fn", list(TORCH_FUNCTIONS))
def test_elementwise_functions(fn, gated, device, dtype):
    """The kernels' elementwise function f and its derivative equal torch's (through its autograd),
    0 included (relu, relu2: f'(0) = 0 as torch). expert_ffn with one expert and identity weights
    computes f(v) (ungated) or f(v) * u (gated on the halves [v | u]); its backward gives the
    gradients of v and u. The reference's activation agrees too."""
    if fn == "identity" and gated:  # no gated identity in the table
        with pytest.raises(ValueError, match="'identity'"):
            ref.activation_name(fn, gated)
        return
    name = ref.activation_name(fn, gated)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    v = torch.cat([torch.linspace(-8, 8, 161, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-9, -1e-9, 30.0, -30.0], dtype=torch.float64)])
    u = torch.randn(v.shape, dtype=torch.float64)
    v, u = v.to(device, dtype), u.to(device, dtype)
    T = v.numel()
    x = torch.stack([v, u], 1).requires_grad_()  # H = 2
    plan = moeyard.plan(torch.zeros(T, 1, dtype=I32, device=device), 1)
    weights = torch.ones(T, 1, dtype=dtype, device=device)
    # layout="matmul": gate_up [E=1, H=2, N1], down [E=1, I=1, H=2]; the first product is [v | u]
    # (gated) or v (ungated), the second puts the activation in y[:, 0].
    eye = torch.eye(2, dtype=dtype, device=device)
    gate_up = (eye if gated else eye[:, :1])[None]
    down = eye[:1][None]
    out = moeyard.expert_ffn(x, plan, weights, gate_up, down, activation=name, layout="matmul",
                             backend="moeyard")
    vt, ut = v.clone().requires_grad_(), u.clone().requires_grad_()
    want = TORCH_FUNCTIONS[fn](vt) * (ut if gated else 1)
    torch.testing.assert_close(out[:, 0], want.detach(), **tol)
    assert (out[:, 1] == 0).all()
    h = torch.stack([v, u], 1) if gated else v[:, None]
    torch.testing.assert_close(ref.activation(h, name)[:, 0], want.detach(), **tol)
    g = torch.randn(T, 2, dtype=dtype, device=device)
    got = torch.autograd.grad(out, x, g)[0]
    want_v, want_u = torch.autograd.grad(want, (vt, ut), g[:, 0], allow_unused=True,
                                         materialize_grads=True)
    torch.testing.assert_close(got[:, 0], want_v, **tol)
    torch.testing.assert_close(got[:, 1], want_u, **tol)
    if fn in ("relu", "relu2"):  # at 0 (+0 and -0): f = 0 and f' = 0
        zero = v == 0
        assert (out[zero, 0] == 0).all() and (got[zero, 0] == 0).all()


# ------------------------------------------------------------------------- expert_ffn forward


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("T,k,E,H,I,capacity,p_none,zipf", FFN_PLANS)
@pytest.mark.parametrize("activation", MATRIX_ACTIVATIONS)
@pytest.mark.parametrize("layout,bias", LAYOUT_BIAS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_matches_reference(backend, device, dtype, T, k, E, H, I, capacity, p_none,
                                      zipf, activation, layout, bias):
    """Every activation, layout, bias and plan kind matches reference.expert_ffn."""
    x, p, weights, params = ffn_setup(T, k, E, H, I, activation, dtype, device, capacity=capacity,
                                      p_none=p_none, zipf=zipf, bias=bias, layout=layout)
    call = lambda: ffn(x, p, weights, *params, activation, layout, backend)  # noqa: E731
    if refused(backend, device, dtype, capacity, ffn_widths(H, I, activation), call):
        return
    out = call()
    want = ffn_ref(x, p, weights, *params, activation, layout, backend)
    assert out.shape == (T, H) and out.device == x.device
    assert_close(out, want, TOL[dtype], scaled=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_dropped_tokens_are_zero_and_never_nan(backend, device, activation):
    """A token with no kept slot (dropped by the capacity or routed nowhere) gets an exactly zero
    row even with biases, and NaN in its x row reaches neither the output nor any gradient."""
    T, k, E, H, I = 40, 2, 4, 16, 8
    x, p, weights, params = ffn_setup(T, k, E, H, I, activation, torch.float32, device,
                                      capacity=6, p_none=0.2, bias=True)
    dead = (p.token_row < 0).all(1)
    assert dead.any() and not dead.all()
    x[dead] = float("nan")
    leaves = [x, weights, *params]
    for t in leaves:
        t.requires_grad_()
    out = ffn(x, p, weights, *params, activation, "linear", backend)
    assert (out[dead] == 0).all()
    assert not out.isnan().any()
    want = ffn_ref(x.detach().nan_to_num(), p, weights, *params, activation, "linear", backend)
    assert_close(out, want, TOL[torch.float32], scaled=True)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for g in grads:
        assert not g.isnan().any()
    assert (grads[0][dead] == 0).all() and (grads[1][dead] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_expert_ffn_equals_grouped_mm_pipeline(device):
    """expert_ffn == grouped_mm (gathering x) -> activation -> grouped_mm -> unpermute, built
    from moeyard's own ops (fp32, dropless with -1 slots)."""
    T, k, E, H, I = 48, 2, 6, 32, 16
    x, p, weights, (gate_up, down, _, _) = ffn_setup(T, k, E, H, I, "gelu", torch.float32,
                                                     device, p_none=0.2)
    w1, w2 = logical(gate_up, down, "linear")
    src = torch.where(p.row_source >= 0, p.row_source // k, -1).to(I32)
    h = moeyard.grouped_mm(x, w1, p.offsets, src)
    y = moeyard.grouped_mm(ref.activation(h, "gelu"), w2, p.offsets)
    want = moeyard.unpermute(y, p, weights)
    assert_close(ffn(x, p, weights, gate_up, down, None, None, "gelu", "linear"), want, 1e-5,
                 scaled=True)


def transposed_copy(t):
    """t's values in a 2-D tensor whose memory order is transposed (a non-contiguous view)."""
    return torch.empty(t.shape[::-1], dtype=t.dtype, device=t.device).t().copy_(t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_strided_inputs(backend, device):
    """x as a column slice, weights [T,k] and both biases as transposed views give the same
    outputs and gradients (with the views' strides) as contiguous copies."""
    T, k, E, H, I = 30, 2, 4, 16, 8
    x, p, weights, (gu, dn, b1, b2) = ffn_setup(T, k, E, H, I, "swiglu", torch.float32, device,
                                                p_none=0.1, bias=True)
    xs = torch.randn(T, H + 6, device=device)[:, 3:3 + H].copy_(x)
    strided = (xs, transposed_copy(weights), transposed_copy(b1), transposed_copy(b2))
    assert not any(t.is_contiguous() for t in strided)
    outs = []
    call = lambda: ffn(x, p, weights, gu, dn, b1, b2, "swiglu", "linear", backend)  # noqa: E731
    if refused(backend, device, torch.float32, None, (H, 2 * I, I), call):
        return
    for xi, wi, b1i, b2i in ((x, weights, b1, b2), strided):
        leaves = [t.detach().requires_grad_() for t in (xi, wi, b1i, b2i)]
        out = ffn(leaves[0], p, leaves[1], gu, dn, *leaves[2:], "swiglu", "linear", backend)
        got = torch.autograd.grad(out, leaves, torch.ones_like(out))
        assert all(g.stride() == t.stride() for g, t in zip(got[2:], leaves[2:]))
        outs.append((out, *got))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------- expert_ffn gradients


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("T,k,E,H,I,capacity,p_none,zipf",
                         [p for p in FFN_PLANS if p.id in GRAD_PLANS])
@pytest.mark.parametrize("activation", MATRIX_ACTIVATIONS)
@pytest.mark.parametrize("layout,bias", LAYOUT_BIAS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_grads_match_reference(backend, device, dtype, T, k, E, H, I, capacity, p_none,
                                          zipf, activation, layout, bias):
    """Gradients w.r.t. x, weights, gate_up, down and the biases match the reference's autograd;
    weight gradients keep the parameters' strides."""
    x, p, weights, params = ffn_setup(T, k, E, H, I, activation, dtype, device, capacity=capacity,
                                      p_none=p_none, zipf=zipf, bias=bias, layout=layout)
    leaves = [t for t in (x, weights, *params) if t is not None]
    for t in leaves:
        t.requires_grad_()
    g = torch.randn(T, H, device=device).to(dtype)
    call = lambda: ffn(x, p, weights, *params, activation, layout, backend)  # noqa: E731
    if refused(backend, device, dtype, capacity, ffn_widths(H, I, activation), call):
        return
    got = torch.autograd.grad(call(), leaves, g)
    want = grads(ffn_ref(x, p, weights, *params, activation, layout, backend), leaves, g)
    for leaf, a, b in zip(leaves, got, want):
        assert a.stride() == leaf.stride() or leaf.numel() == 0
        assert_close(a, b, GRAD_TOL[dtype], scaled=True)


# Every activation of the table, on a smaller matrix than MATRIX_ACTIVATIONS': (T, k, E, H, I,
# capacity, p_none, layout, bias), dropless with -1 slots and a capacity with drops.
EVERY_ACTIVATION_CASES = [
    pytest.param(41, 3, 6, 24, 16, None, 0.3, "linear", True, id="dropless-linear-bias"),
    pytest.param(50, 2, 4, 32, 16, 18, 0.1, "matmul", False, id="capacity-matmul"),
]


@pytest.mark.parametrize("device,dtype", [p for p in DEVICE_DTYPES if p.values[1] != torch.float16])
@pytest.mark.parametrize("T,k,E,H,I,capacity,p_none,layout,bias", EVERY_ACTIVATION_CASES)
@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_every_activation(backend, activation, T, k, E, H, I, capacity, p_none, layout,
                                     bias, device, dtype):
    """Every activation: the output and the gradients of x, the routing weights, gate_up, down
    and the biases match the reference."""
    x, p, weights, params = ffn_setup(T, k, E, H, I, activation, dtype, device, capacity=capacity,
                                      p_none=p_none, bias=bias, layout=layout)
    leaves = [t.requires_grad_() for t in (x, weights, *params) if t is not None]
    g = torch.randn(T, H, device=device).to(dtype)
    call = lambda: ffn(x, p, weights, *params, activation, layout, backend)  # noqa: E731
    if refused(backend, device, dtype, capacity, ffn_widths(H, I, activation), call):
        return
    out = call()
    want = ffn_ref(x, p, weights, *params, activation, layout, backend)
    assert_close(out, want, TOL[dtype], scaled=True)
    for a, b in zip(torch.autograd.grad(out, leaves, g), grads(want, leaves, g)):
        assert_close(a, b, GRAD_TOL[dtype], scaled=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("given", ["b1", "b2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_one_bias_grads(backend, device, given):
    """Only one of the two biases given (the other None): its gradient and the rest still match
    (the autograd maps gradients to the inputs that exist)."""
    x, p, weights, (gu, dn, b1, b2) = ffn_setup(20, 2, 4, 8, 8, "swiglu", torch.float32, device,
                                                p_none=0.1, bias=True)
    b1, b2 = (b1, None) if given == "b1" else (None, b2)
    leaves = [t.requires_grad_() for t in (x, weights, gu, dn, b1 if given == "b1" else b2)]
    g = torch.randn(20, 8, device=device)
    call = lambda: ffn(x, p, weights, gu, dn, b1, b2, "swiglu", "linear", backend)  # noqa: E731
    if refused(backend, device, torch.float32, None, (8, 16, 8), call):
        return
    got = torch.autograd.grad(call(), leaves, g)
    want = grads(ffn_ref(x, p, weights, gu, dn, b1, b2, "swiglu", "linear", backend), leaves, g)
    for a, b in zip(got, want):
        assert_close(a, b, GRAD_TOL[torch.float32], scaled=True)


@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS))
@pytest.mark.parametrize("capacity,p_none,layout", [(None, 0.3, "linear"), (3, 0.0, "matmul")],
                         ids=["dropless-linear", "capacity-matmul"])
def test_expert_ffn_gradcheck(activation, capacity, p_none, layout):
    """fp64 gradcheck of every input (moeyard's backend: torch's grouped GEMM has no float64; its
    gradients are held to the reference's autograd in fp32 above). Pre-activations stay far below
    swiglu_oss's clamp at 7 and away from the relu kinks with probability ~1."""
    x, p, weights, params = ffn_setup(7, 2, 3, 5, 3, activation, torch.float64, "cpu",
                                      capacity=capacity, p_none=p_none, bias=True, layout=layout)
    weights = weights.double()
    inputs = tuple(t.requires_grad_() for t in (x, weights, *params))
    assert torch.autograd.gradcheck(
        lambda x, w, gu, dn, b1, b2: ffn(x, p, w, gu, dn, b1, b2, activation, layout, "moeyard"),
        inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_backward_reuses_a_dead_pre_activation(backend, device):
    """The backward writes the pre-activation's gradient over the saved pre-activation when nothing
    can read it afterwards (consume_h): same gradients as the functional form, h overwritten; and
    expert_ffn's autograd does it only when the graph is not kept (retain_graph works, twice)."""
    x, p, weights, params = ffn_setup(40, 2, 4, 16, 8, "swiglu", torch.float32, device,
                                      p_none=0.1, bias=True)
    w1, w2 = logical(params[0], params[1], "linear")
    args = (x, p.row_source, p.token_row, p.offsets, None, weights, w1, w2, *params[2:], "swiglu")
    call = lambda: torch.ops.moeyard._expert_ffn_forward(*args, backend)  # noqa: E731
    if refused(backend, device, torch.float32, None, (16, 16, 8), call):
        return
    _, h = call()
    grad = torch.randn_like(x)
    want = torch.ops.moeyard._expert_ffn_backward(grad, *args, h, [True] * 6, backend, False)
    h_before = h.clone()
    got = torch.ops.moeyard._expert_ffn_backward(grad, *args, h, [True] * 6, backend, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not torch.equal(h, h_before)  # its buffer now holds the gradient

    leaves = [t.requires_grad_() for t in (x, weights, *params)]
    out = ffn(x, p, weights, *params, "swiglu", "linear", backend)
    kept = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    again = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    last = torch.autograd.grad(out, leaves, grad)  # the graph goes: h may be consumed
    for a, b, c in zip(kept, again, last):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend, device):
    """Two runs give bitwise equal outputs and gradients (grad_a sums repeats in row order; the
    combine gathers)."""
    a, b, offsets, a_index, _ = gmm_inputs(300, 8, 64, 48, "zipf", "gathered", "nk",
                                           torch.bfloat16, device)
    a.requires_grad_()
    b.requires_grad_()
    x, p, weights, params = ffn_setup(200, 4, 8, 64, 32, "swiglu", torch.bfloat16, device,
                                      p_none=0.1, bias=True)
    leaves = [x, weights, *params]
    for t in leaves:
        t.requires_grad_()

    def run():
        out = moeyard.grouped_mm(a, b, offsets, a_index, backend=backend)
        y = ffn(x, p, weights, *params, "swiglu", "linear", backend)
        grads = torch.autograd.grad((out.float().sum(), y.float().square().sum()), (a, b, *leaves))
        return (out, y, *grads)

    if refused(backend, device, torch.bfloat16, None, (64, 48), run):
        return
    for u, v in zip(run(), run()):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_grouped_mm(backend, device):
    ops = torch.ops.moeyard
    for mode, order in (("plain", "kn"), ("gathered", "nk"), ("capacity", "nk"),
                        ("plan_capacity", "kn")):
        a, b, offsets, a_index, C = gmm_inputs(30, 4, 12, 8, "random", mode, order, torch.float32,
                                               device)
        if not (backend == "moeyard" or ref.grouped_mm_serves(device, torch.float32, C, (12, 8))):
            continue  # refusals: test_grouped_mm_matches_reference
        for rg in (False, True):
            ar, br = a.clone().requires_grad_(rg), b.clone().requires_grad_(rg)
            torch.library.opcheck(ops.grouped_mm.default, (ar, br, offsets, a_index, C, backend))
        g = torch.randn(a.shape[0] if a_index is None else a_index.shape[0], 8, device=device)
        for need_a, need_b in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(ops.grouped_mm_backward.default,
                                  (g, a, b, offsets, a_index, C, need_a, need_b, backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity", [None, 9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_expert_ffn(backend, device, activation, capacity):
    ops = torch.ops.moeyard
    if not (backend == "moeyard" or ref.grouped_mm_serves(device, torch.float32, capacity, (8,))):
        pytest.skip("refusals: test_expert_ffn_matches_reference")
    x, p, weights, (gu, dn, b1, b2) = ffn_setup(20, 2, 4, 8, 8, activation, torch.float32, device,
                                                capacity=capacity, p_none=0.1, bias=True)
    w1, w2 = logical(gu, dn, "linear")
    plan_args = (p.row_source, p.token_row, p.offsets, capacity)
    for rg in (False, True):
        xr, wr, w1r, w2r, b1r, b2r = (t.clone().requires_grad_(rg)
                                      for t in (x, weights, w1, w2, b1, b2))
        torch.library.opcheck(ops.expert_ffn.default,
                              (xr, *plan_args, wr, w1r, w2r, b1r, b2r, activation, backend))
        torch.library.opcheck(ops.expert_ffn.default,
                              (xr, *plan_args, wr, w1r, w2r, None, None, activation, backend))
    fwd_args = (x, *plan_args, weights, w1, w2, b1, b2, activation)
    torch.library.opcheck(ops._expert_ffn_forward.default, (*fwd_args, backend))
    torch.library.opcheck(ops._expert_ffn_forward.default,
                          (x, *plan_args, weights, w1, w2, None, None, activation, backend))
    _, h = ops._expert_ffn_forward(*fwd_args, backend)
    grad = torch.randn_like(x)
    for mask in ([True] * 6, [True, False, False, True, False, True],
                 [False, True, True, False, True, False]):
        torch.library.opcheck(ops._expert_ffn_backward.default,
                              (grad, *fwd_args, h, mask, backend))


# ---------------------------------------------------------------------------- torch.compile


def moe_layer(x, router_w, gate_up, down, b1, b2, k, capacity, backend="auto"):
    """Router -> route -> plan -> expert_ffn (GPT-OSS-like: biases, swiglu_oss, matmul layout)."""
    logits = x.float() @ router_w.t()
    weights, experts = moeyard.route(logits, k, topk_before_score=True)
    p = moeyard.plan(experts, router_w.shape[0], capacity)
    return moeyard.expert_ffn(x, p, weights, gate_up, down, b1, b2, "swiglu_oss", "matmul",
                              backend=backend)


def _layer_params(T, H, I, E, device, dtype=torch.float32):
    return (torch.randn(T, H, device=device).to(dtype), torch.randn(E, H, device=device),
            (torch.randn(E, H, 2 * I, device=device) / H**0.5).to(dtype),
            (torch.randn(E, I, H, device=device) / I**0.5).to(dtype),
            (0.1 * torch.randn(E, 2 * I, device=device)).to(dtype),
            (0.1 * torch.randn(E, H, device=device)).to(dtype))


def _fwd_bwd(fn, inputs, k, capacity, backend="auto"):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs, k, capacity, backend)
    out.float().square().sum().backward()
    return (out, *(t.grad for t in inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [None, 12])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend, device, capacity):
    torch._dynamo.reset()
    inputs = _layer_params(48, 16, 8, 6, device)
    if refused(backend, device, torch.float32, capacity, (16, 16, 8),
               lambda: _fwd_bwd(moe_layer, inputs, 2, capacity, backend)):
        return
    eager = _fwd_bwd(moe_layer, inputs, 2, capacity, backend)
    compiled = torch.compile(moe_layer, fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, inputs, 2, capacity, backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _fwd_bwd(compiled, [torch.randn_like(inputs[0]), *inputs[1:]], 2, capacity, backend)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity", [None, 80])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_layer_forward_backward(backend, dtype, capacity):
    """A whole layer (router, route, plan, expert_ffn) forward and backward, captured once and
    replayed on new inputs, equals eager."""
    T, H, I, E, k = 256, 64, 32, 8, 2
    static = [t.requires_grad_() for t in _layer_params(T, H, I, E, "cuda", dtype)]
    if refused(backend, "cuda", dtype, capacity, (H, 2 * I, I),
               lambda: moe_layer(*static, k, capacity, backend)):
        return

    def step():
        for t in static:
            t.grad = None
        out = moe_layer(*static, k, capacity, backend)
        out.float().square().sum().backward()
        return out

    side = torch.cuda.Stream()  # warm up (allocations, autograd's streams) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in static:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    static_grads = [t.grad for t in static]
    for _ in range(3):
        with torch.no_grad():
            for t in static:
                t.copy_(torch.randn_like(t) / (t.shape[-2] ** 0.5 if t.dim() == 3 else 1))
        graph.replay()
        torch.cuda.synchronize()
        want = _fwd_bwd(moe_layer, static, k, capacity, backend)
        for a, b in zip((static_out, *static_grads), want):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- bad input


def _gmm_ok():
    """A valid small grouped_mm call's arguments (E=2, K=3, N=5, R=4)."""
    return (torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 1, 4], dtype=I32))


def _gmm(**kw):
    a, b, offsets = _gmm_ok()
    args = dict(a=a, b=b, offsets=offsets, a_index=None, capacity=None)
    args.update(kw)
    return lambda: torch.ops.moeyard.grouped_mm(*args.values())


def _idx(*v):
    return torch.tensor(v, dtype=I32)


def _bad(cases):
    """pytest params from {id: (call, regex the message must match)}."""
    return [pytest.param(fn, msg, id=i) for i, (fn, msg) in cases.items()]


GMM_BAD = {
    "K-mismatch": (_gmm(b=torch.randn(2, 4, 5)), r"a has K = 3 columns .* K = 4"),
    "b-dtype": (_gmm(b=torch.randn(2, 3, 5).double()), "b must have a's dtype"),
    "int-data": (_gmm(a=torch.ones(4, 3, dtype=torch.long), b=torch.ones(2, 3, 5).long()),
                 "floating-point"),
    "a-rank": (_gmm(a=torch.randn(4, 3, 1)), "a must have 2 dimensions"),
    "b-rank": (_gmm(b=torch.randn(3, 5)), "b must have 3 dimensions"),
    "offsets-int64": (_gmm(offsets=torch.tensor([0, 1, 4])), "offsets must be Int"),
    "offsets-short": (_gmm(offsets=_idx(0, 4)), r"offsets must have E\+1 = 3"),
    "offsets-long": (_gmm(offsets=_idx(0, 1, 2, 4)), r"offsets must have E\+1 = 3"),
    "offsets-start": (_gmm(offsets=_idx(1, 2, 4)), "offsets must start at 0"),
    "offsets-decreasing": (_gmm(offsets=_idx(0, 3, 2)), "offsets must not decrease"),
    "offsets-past-R": (_gmm(offsets=_idx(0, 1, 5)), "offsets must end at most at R = 4"),
    "a_index-past-A": (_gmm(a_index=_idx(0, 1, 4, 2)), r"a_index\[2\] = 4 is out of range"),
    "a_index-below-minus-1": (_gmm(a_index=_idx(0, -2, 1, 2)),
                              r"a_index\[1\] = -2 is out of range"),
    "a_index-int64": (_gmm(a_index=torch.tensor([0, 1, 2, 3])), "a_index must be Int"),
    "a_index-shorter-than-offsets": (_gmm(a_index=_idx(0, 1, 2)), "at most at R = 3"),
    "capacity-R-not-E*C": (_gmm(capacity=3), r"E\*C = 6 rows, got 4"),
    "capacity-count-over-C": (_gmm(capacity=2), "expert 1 keeps 3 rows, more than the capacity"),
    "capacity-negative": (_gmm(capacity=-1), "capacity must be >= 0"),
}


@pytest.mark.parametrize("fn,msg", _bad(GMM_BAD))
def test_grouped_mm_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


def _ffn(activation="swiglu", **kw):
    """A valid expert_ffn call (T=6, k=2, E=3, H=4, I=2, N1=4), overridden by kw."""
    p = moeyard.plan(_idx(0, 1, 1, 2, 2, 0, 0, -1, 1, 2, 0, 1).view(6, 2), 3)
    args = dict(x=torch.randn(6, 4), row_source=p.row_source, token_row=p.token_row,
                offsets=p.offsets, capacity=None, weights=torch.rand(6, 2),
                w1=torch.randn(3, 4, 4), w2=torch.randn(3, 2, 4), b1=None, b2=None,
                activation=activation)
    args.update(kw)
    return lambda: torch.ops.moeyard.expert_ffn(*args.values())


W1_ODD, W2_FOR_ODD = torch.randn(3, 4, 5), torch.randn(3, 2, 4)
FFN_BAD = {
    "w1-H": (_ffn(w1=torch.randn(3, 5, 4)), "gate_up must map H = 4"),
    "w2-I": (_ffn(w2=torch.randn(3, 3, 4)), r"down must be logical .* got \[3, 3, 4\]"),
    "w2-H": (_ffn(w2=torch.randn(3, 2, 5)), r"down must be logical .* got \[3, 2, 5\]"),
    "w2-E": (_ffn(w2=torch.randn(2, 2, 4)), r"down must be logical .* got \[2, 2, 4\]"),
    "E-vs-offsets": (_ffn(w1=torch.randn(4, 4, 4), w2=torch.randn(4, 2, 4)),
                     r"offsets must have E\+1 = 5"),
    "unknown-activation": (_ffn("swish"), "activation must be one of 'none', 'silu', .*'swish'"),
    "swiglu-odd-N1": (_ffn(w1=W1_ODD, w2=W2_FOR_ODD), "'swiglu' needs an even gate_up width"),
    "swiglu_oss-odd-N1": (_ffn("swiglu_oss", w1=W1_ODD, w2=W2_FOR_ODD),
                          "'swiglu_oss' needs an even gate_up width"),
    "weights-k": (_ffn(weights=torch.rand(6, 3)), "weights must have the shape"),
    "weights-T": (_ffn(weights=torch.rand(5, 2)), "weights must have the shape"),
    "x-T": (_ffn(x=torch.randn(5, 4)), "x has 5 tokens"),
    "x-dtype": (_ffn(x=torch.randn(6, 4).double()), "must have x's dtype"),
    "b1-shape": (_ffn(b1=torch.randn(3, 3)), r"bias must be \[E, 4\] = \[3, 4\], got \[3, 3\]"),
    "b2-shape": (_ffn(b2=torch.randn(3, 5)), r"bias must be \[E, 4\] = \[3, 4\], got \[3, 5\]"),
    "capacity-R-not-E*C": (_ffn(capacity=3), r"E\*C = 9 rows, got 12"),
}


@pytest.mark.parametrize("fn,msg", _bad(FFN_BAD))
def test_expert_ffn_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


def test_expert_ffn_bad_layout():
    x, p, weights, params = ffn_setup(4, 1, 2, 4, 2, "relu", torch.float32, "cpu")
    with pytest.raises(ValueError, match="layout"):
        moeyard.expert_ffn(x, p, weights, *params, "relu", "nn.Linear")


@pytest.mark.gpu
def test_bad_devices():
    """Tensors on different devices, and fp64 on CUDA, raise instead of crashing."""
    a, b, offsets = _gmm_ok()
    ac, bc, oc = a.cuda(), b.cuda(), offsets.cuda()
    cases = [
        (lambda: moeyard.grouped_mm(ac, bc, offsets), "offsets .* must be on the same device"),
        (lambda: moeyard.grouped_mm(ac, b, oc), "b .* must be on the same device"),
        (lambda: moeyard.grouped_mm(ac, bc, oc, _idx(0, 1, 2, 3)),
         "a_index .* must be on the same device"),
        (lambda: moeyard.grouped_mm(ac.double(), bc.double(), oc), "float64 .* CPU only"),
        (_ffn(x=torch.randn(6, 4, device="cuda")), "must be on the same device"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


# ----------------------------------------------------------------------------- backend choice


def _aligned_ffn(dtype, H=16, I=8, T=40):
    x, p, weights, params = ffn_setup(T, 2, 4, H, I, "swiglu", dtype, "cpu", p_none=0.1)
    return lambda backend: ffn(x, p, weights, *params, "swiglu", "linear", backend)


def test_auto_takes_the_table_entry():
    """On the CPU "auto" is the backend the table names for the dtype (bf16, where the two
    backends round differently, so the output tells them apart) and moeyard's for float64."""
    table = moeyard.experts_backend_table()
    cpu = next(d for d in table["devices"] if d["device"] == "cpu")
    run = _aligned_ffn(torch.bfloat16)
    outs = {b: run(b) for b in BACKENDS}
    assert not torch.equal(outs["moeyard"], outs["grouped_mm"])
    assert torch.equal(run("auto"), outs[cpu["auto"]["bfloat16"]])
    assert cpu["auto"]["float64"] == "moeyard"
    run64 = _aligned_ffn(torch.float64)
    assert torch.equal(run64("auto"), run64("moeyard"))
    assert all(r["evidence"] for r in table["rules"])


def _python(code, **env):
    """Runs ``code`` in a fresh interpreter (process-wide state: environment, warn-once)."""
    import subprocess
    import sys
    full_env = {**__import__("os").environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=300)


_SETUP = """
import torch, moeyard
torch.manual_seed(0)
dt = torch.{dtype}
x = torch.randn(40, {H}).to(dt); w = torch.rand(40, 2)
p = moeyard.plan(torch.rand(40, 4).argsort(1)[:, :2].int(), 4)
gu = (torch.randn(4, 16, {H}) / 4).to(dt); dn = (torch.randn(4, {H}, 8) / 3).to(dt)
f = lambda b: moeyard.expert_ffn(x, p, w, gu, dn, backend=b)
"""


def test_env_var_replaces_auto_only():
    """MOEYARD_EXPERTS_BACKEND replaces "auto"; a backend named in the call still wins; an
    unknown value is refused naming the variable."""
    for env, other in (("moeyard", "grouped_mm"), ("grouped_mm", "moeyard")):
        code = _SETUP.format(H=16, dtype="bfloat16") + (  # bf16: the backends round differently
            f"assert torch.equal(f('auto'), f('{env}'))\n"
            f"assert not torch.equal(f('auto'), f('{other}'))\n"
            "print('ok')")
        proc = _python(code, MOEYARD_EXPERTS_BACKEND=env)
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    proc = _python(_SETUP.format(H=16, dtype="bfloat16") + "f('auto')",
                   MOEYARD_EXPERTS_BACKEND="cutlass")
    assert proc.returncode != 0
    assert "MOEYARD_EXPERTS_BACKEND must be 'auto', 'grouped_mm' or 'moeyard', got 'cutlass'" in \
        proc.stderr


def test_auto_falls_back_to_moeyard_once_with_a_warning():
    """Where the table's backend cannot serve the inputs (a row width torch's GEMM cannot take),
    "auto" computes on moeyard's kernel and says why, once per process (float32: the CPU row of
    the table names grouped_mm)."""
    assert moeyard.experts_backend_table()["devices"][0]["auto"]["float32"] == "grouped_mm"
    code = _SETUP.format(H=13, dtype="float32") + (
        "for _ in range(3): assert torch.equal(f('auto'), f('moeyard'))\n"
        "print('ok')")
    proc = _python(code, MOEYARD_EXPERTS_BACKEND="")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "instead of torch's grouped GEMM" in ln]
    assert len(warnings) == 1, proc.stderr
    assert "row width of 13 elements" in warnings[0]


def test_grouped_mm_backend_refusals():
    """backend="grouped_mm" refuses, saying why, what torch's grouped GEMM cannot compute."""
    x, p, weights, (gu, dn, _, _) = ffn_setup(20, 2, 4, 16, 8, "swiglu", torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="no float64 kernel"):
        moeyard.expert_ffn(x, p, weights, gu, dn, backend="grouped_mm")
    x, gu, dn = x.float(), gu.float(), dn.float()
    wide = torch.randn(4, 16, 17)  # gate_up as a view whose rows are 17 elements apart
    with pytest.raises(RuntimeError, match=r"strides \[272, 1, 17\] is not 16-byte aligned"):
        moeyard.expert_ffn(x, p, weights, wide[:, :, :16], dn, backend="grouped_mm")
    with pytest.raises(RuntimeError, match="row width of 6 elements"):
        moeyard.grouped_mm(torch.randn(5, 6), torch.randn(2, 6, 8),
                           offsets_of(torch.tensor([2, 3])), backend="grouped_mm")
    # the moeyard backend takes them all
    moeyard.expert_ffn(x, p, weights, wide[:, :, :16], dn, backend="moeyard")


def test_bad_backend_name_on_every_path():
    x, p, weights, (gu, dn, _, _) = ffn_setup(10, 2, 4, 8, 8, "swiglu", torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend must be 'auto', 'grouped_mm' or 'moeyard'"):
        moeyard.expert_ffn(x, p, weights, gu, dn, backend="cublas")
    meta = [t.to("meta") for t in (x, p.row_source, p.token_row, p.offsets)]
    w1, w2 = (t.to("meta").transpose(1, 2) for t in (gu, dn))
    args = (*meta, None, weights.to("meta"), w1, w2, None, None, "swiglu")
    assert torch.ops.moeyard.expert_ffn(*args, "auto").shape == x.shape
    with pytest.raises(Exception, match="backend must be one of"):
        torch.ops.moeyard.expert_ffn(*args, "cublas")
    with pytest.raises(ValueError, match="backend must be one of"):
        moeyard.Experts(4, 8, 8, backend="cublas")


def test_layer_backend_attribute():
    """A layer's backend= reaches its experts, can be changed later, and both backends give the
    same layer output and gradients (fp32)."""
    layer = moeyard.TopKMoE(16, 8, 4, k=2, backend="moeyard")
    assert layer.experts.backend == "moeyard" and "backend='moeyard'" in repr(layer)
    x = torch.randn(2, 10, 16)
    results = []
    for backend in BACKENDS:
        layer.experts.backend = backend
        xr = x.clone().requires_grad_()
        out = layer(xr)
        results.append((out, *torch.autograd.grad(out.square().sum(), (xr, *layer.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.experts.backend = "triton"


def test_info_prints_the_backend_table():
    proc = _python("from moeyard.__main__ import main; main(['info'])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'experts backend "auto" picks' in proc.stdout
    assert "cpu              bfloat16" in proc.stdout and "-> grouped_mm" in proc.stdout
