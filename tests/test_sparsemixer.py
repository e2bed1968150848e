"""sparsemixer (GRIN's SparseMixer-v2, PhiMoE): the CPU and CUDA kernels against reference.py and
against transformers' own ``sparsemixer`` (fed the same random draws), the gradient estimator
(fp64 gradcheck of its formula, independence from the midpoint factor), sampling statistics,
NaN/Inf, ties, bad input, opcheck, torch.compile, and on the GPU CUDA == CPU and CUDA graphs."""
import contextlib
import math

import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES

SHAPES = [(0, 8), (1, 2), (5, 3), (37, 16), (300, 64), (129, 160), (40, 1000)]
EPS = [0.01, 0.1, 0.5]


def logits_for(T, E, eps, device="cpu", dtype=torch.float32):
    """Logits whose windows hold several experts for this eps: the window keeps z >= m / (1 + 2
    eps) for m > 0, so the logits sit near a positive common value (plus a few far below)."""
    z = 4.0 + (4.0 * eps) * torch.randn(T, E)
    z[:, ::5] -= 6.0
    return z.to(device=device, dtype=dtype)


def noise_for(T, E, device="cpu", seed=0):
    return moeyard.sparsemixer_noise(T, E, device, torch.Generator(device).manual_seed(seed))


def assert_matches_reference(got, want):
    """Experts equal (the selection compares the same fp32 numbers), weights close (exp and the
    softmax sums round differently; more so over wide windows)."""
    (w, e), (w_ref, e_ref) = got, want
    assert w.dtype == w_ref.dtype and e.dtype == torch.int32 and e.shape == e_ref.shape
    assert torch.equal(e.cpu(), e_ref.cpu())
    tol = 1e-6 if w.shape[0] == 0 or e_ref.max() < 256 else 1e-5
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=tol, atol=tol, equal_nan=True)


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("T,E", SHAPES)
def test_matches_reference(device, training, eps, T, E):
    z = logits_for(T, E, eps, device)
    noise = noise_for(T, E, device) if training else None
    got = moeyard.sparsemixer(z, eps, training, noise=noise)
    assert_matches_reference(got, ref.sparsemixer(z, eps, noise))
    e = got[1].long()
    assert ((e >= 0) & (e < E)).all() and (e[:, 0] != e[:, 1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dtypes(device, dtype, training):
    T, E = 200, 16
    z = logits_for(T, E, 0.1, device, dtype)
    noise = noise_for(T, E, device) if training else None
    got = moeyard.sparsemixer(z, 0.1, training, noise=noise)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches_reference(got, ref.sparsemixer(z, 0.1, noise))


def test_window_and_weights_by_hand():
    """Slot 1 softmaxes the experts within 2 eps (relative) of the max, slot 2 those within 2 eps
    of the best remaining one, with the window's factor max(|z|, m) of the original logits."""
    z = torch.tensor([[10.0, 9.9, 9.5, 9.85, -1.0]])
    w, e = moeyard.sparsemixer(z, jitter_eps=0.01)  # window: (m - z) / max(|z|, m) <= 0.02
    assert e.tolist() == [[0, 1]]
    p1 = torch.softmax(z[0, [0, 1, 3]], 0)[0]  # 9.5: (10 - 9.5) / 10 = 0.05 > 0.02
    p2 = torch.softmax(z[0, [1, 3]], 0)[0]  # m = 9.9: 9.5 is out (0.4 / 9.9), 9.85 in
    torch.testing.assert_close(w[0], torch.stack([p1, p2]))
    neg = torch.tensor([[-1.0, -1.015, -1.03, -2.0]])  # m < 0: factor |z|
    w, e = moeyard.sparsemixer(neg, jitter_eps=0.01)
    assert e.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0, 0], torch.softmax(neg[0, :2], 0)[0])  # 0.03/1.03 > 0.02
    torch.testing.assert_close(w[0, 1], torch.softmax(neg[0, 1:3], 0)[0])  # 0.015/1.03 <= 0.02


def test_two_experts_and_ties():
    w, e = moeyard.sparsemixer(torch.randn(30, 2), 0.01)
    assert (e.sort(-1).values == torch.tensor([0, 1], dtype=torch.int32)).all()
    torch.testing.assert_close(w[:, 1], torch.ones(30))  # slot 2's only candidate
    w, e = moeyard.sparsemixer(torch.zeros(3, 5))  # 0/0: nothing masked; ties to the lower id
    assert e.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(w, torch.tensor([[1 / 5, 1 / 4]] * 3))


# ------------------------------------------------------------------------- transformers' own


def _transformers_sparsemixer():
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    return phimoe.sparsemixer


@contextlib.contextmanager
def recorded_draws(draws):
    """Record every random draw transformers' sparsemixer makes (its ``exponential_``,
    ``rand_like`` and ``uniform_`` calls), in order, as ``(name, tensor)``."""
    mp = pytest.MonkeyPatch()
    for owner, name in ((torch.Tensor, "exponential_"), (torch.Tensor, "uniform_"),
                        (torch, "rand_like")):
        def wrapped(*args, _f=getattr(owner, name), _name=name, **kwargs):
            out = _f(*args, **kwargs)
            draws.append((_name, out.clone()))
            return out
        mp.setattr(owner, name, wrapped)
    try:
        yield draws
    finally:
        mp.undo()


def noise_from_draws(draws, E):
    """transformers' draws as sparsemixer's noise: per slot -log(Exponential) and the uniform it
    compares with 0.75 (slot 2's rand_like is overwritten by uniform_: the last draw counts)."""
    names = [n for n, _ in draws]
    assert names == ["exponential_", "rand_like", "exponential_", "rand_like", "uniform_"], names
    (_, x1), (_, u1), (_, x2), _, (_, u2) = draws
    g = torch.stack([-x1.log(), -x2.log()], 1)
    return torch.cat([g, torch.stack([u1, u2], 1)], -1).float()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_matches_transformers(training, eps):
    """transformers' PhiMoE sparsemixer and moeyard's on the same logits (and, in training, the
    same random draws: recorded from transformers' call and passed as ``noise``): the same
    experts, weights and gradient (transformers' PhimoeMultiplier) for a random upstream grad."""
    hf_sparsemixer = _transformers_sparsemixer()
    T, E = 4000, 16
    z = logits_for(T, E, eps).requires_grad_()
    g = torch.randn(T, 2)
    draws = []
    with recorded_draws(draws):
        w_hf, e_hf = hf_sparsemixer(z, jitter_eps=eps, training=training)
    (grad_hf,) = torch.autograd.grad((w_hf * g).sum(), z)
    noise = noise_from_draws(draws, E) if training else None
    if not training:
        assert draws == []
    w, e = moeyard.sparsemixer(z, eps, training, noise=noise)
    (grad,) = torch.autograd.grad((w * g).sum(), z)
    assert torch.equal(e.long(), e_hf)
    torch.testing.assert_close(w, w_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_hf, rtol=1e-5, atol=1e-6)
    if training:  # not vacuous: some samples are not the argmax, some weights are scaled
        argmax = moeyard.sparsemixer(z.detach(), eps)[1]
        assert (e[:, 0] != argmax[:, 0]).float().mean() > 0.05
        unscaled = noise.clone()
        unscaled[..., E] = 0.9
        p = moeyard.sparsemixer(z.detach(), eps, True, noise=unscaled)[0]
        scaled = ~torch.isclose(w.detach(), p)
        assert scaled.any()
        torch.testing.assert_close(w.detach()[scaled], p[scaled] * 0.3333)


# ---------------------------------------------------------------------------------- gradients


def _grad(z, eps, noise, g):
    z = z.detach().requires_grad_()
    w, _ = moeyard.sparsemixer(z, eps, noise is not None, noise=noise)
    return torch.autograd.grad((w * g).sum(), z)[0]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(training):
    """fp64 gradcheck of the estimator p_j[e_j] (onehot(e_j) - p_j): the true derivative of the
    eval weights, and of the training weights when no midpoint factor applies (every uniform
    draw > 0.75) while the Gumbel samples still pick other experts than the argmax."""
    T, E, eps = 8, 10, 0.3
    z = logits_for(T, E, eps, dtype=torch.float64).requires_grad_()
    noise = None
    if training:
        noise = noise_for(T, E)
        noise[..., E] = 0.9
        assert (moeyard.sparsemixer(z, eps, True, noise=noise)[1]
                != moeyard.sparsemixer(z, eps)[1]).any()
    assert torch.autograd.gradcheck(
        lambda v: moeyard.sparsemixer(v, eps, training, noise=noise)[0], (z,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_is_the_estimator_formula(device):
    """The training gradient equals the reference's (the same formula), ignores the midpoint
    factor (uniform draws 0 or 0.9 give the same gradient though the weights differ), and equals
    the formula written out here from the reference's window probabilities."""
    T, E, eps = 300, 16, 0.1
    z = logits_for(T, E, eps, device)
    noise = noise_for(T, E, device)
    g = torch.randn(T, 2, device=device)
    lo, hi = noise.clone(), noise.clone()
    lo[..., E], hi[..., E] = 0.0, 0.9
    w_lo, w_hi = moeyard.sparsemixer(z, eps, True, noise=lo)[0], moeyard.sparsemixer(
        z, eps, True, noise=hi)[0]
    assert not torch.equal(w_lo, w_hi)
    grad = _grad(z, eps, lo, g)
    torch.testing.assert_close(grad, _grad(z, eps, hi, g), rtol=0, atol=0)
    zr = z.detach().requires_grad_()
    w_ref, e = ref.sparsemixer(zr, eps, lo)
    torch.testing.assert_close(grad, torch.autograd.grad((w_ref * g).sum(), zr)[0], rtol=1e-5,
                               atol=1e-6)
    want = torch.zeros_like(z)
    for j, p in enumerate(window_probs(z, e, eps)):
        onehot = torch.nn.functional.one_hot(e[:, j].long(), E).float()
        pe = p.gather(1, e[:, j:j + 1].long())
        want += g[:, j:j + 1] * pe * (onehot - p)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def window_probs(z, experts, eps):
    """Each slot's window softmax, [T,E] twice, written out for the formula check."""
    out, excluded = [], torch.zeros_like(z, dtype=torch.bool)
    for j in range(2):
        m = z.masked_fill(excluded, -math.inf).max(-1, keepdim=True).values
        inside = ~excluded & ((m - z) / torch.maximum(z.abs(), m) <= 2 * eps)
        out.append(torch.softmax(z.masked_fill(~inside, -math.inf), -1))
        excluded = excluded.scatter(1, experts[:, j:j + 1].long(), True)
    return out


def test_no_grad_for_noise_and_empty_batch():
    z = torch.randn(0, 6, requires_grad=True)
    w, e = moeyard.sparsemixer(z, training=True)
    assert w.shape == (0, 2) and e.shape == (0, 2)
    w.sum().backward()
    assert z.grad.shape == (0, 6)


# ------------------------------------------------------------------------------- sampling


def test_sampling_follows_the_window_softmax():
    """Over many draws slot 1 picks expert e with probability p_1[e] (Gumbel-max over the
    window), and a slot that did not pick its argmax is scaled by 0.3333 three times in four."""
    E, n, eps = 6, 40000, 0.02
    row = torch.tensor([5.0, 4.5, 4.85, 4.95, 1.0, 4.9])  # window (5 - z) / 5 <= 0.04: z >= 4.8
    z = row.expand(n, E).contiguous()
    w, e = moeyard.sparsemixer(z, eps, training=True,
                               generator=torch.Generator().manual_seed(0))
    p = window_probs(z[:1], torch.zeros(1, 2, dtype=torch.int32), eps)[0][0]
    assert p[4] == 0 and p[1] == 0 and (p[[0, 2, 3, 5]] > 0.1).all()
    freq = torch.bincount(e[:, 0].long(), minlength=E).double() / n
    assert (freq - p.double()).abs().max() < 4 * math.sqrt(0.25 / n)
    scaled = ~torch.isclose(w[:, 0], p[e[:, 0].long()])
    not_argmax = e[:, 0] != 0
    assert not scaled[~not_argmax].any()
    assert abs(scaled[not_argmax].float().mean().item() - 0.75) < 0.02


def test_generator_reproducible():
    z = torch.randn(64, 8)
    a = moeyard.sparsemixer(z, 0.3, True, generator=torch.Generator().manual_seed(5))
    b = moeyard.sparsemixer(z, 0.3, True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(3)
    c = moeyard.sparsemixer(z, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(c[1], moeyard.sparsemixer(z, 0.3, True)[1])
    noise = moeyard.sparsemixer_noise(64, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(moeyard.sparsemixer(z, 0.3, True, noise=noise)[1], a[1])
    assert noise.shape == (64, 2, 9) and (noise[..., 8] >= 0).all() and (noise[..., 8] < 1).all()


# ------------------------------------------------------------------------------ NaN / Inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nan_inf(device, training):
    nan, inf = float("nan"), float("inf")
    z = torch.tensor([[1.0, nan, 3.0, 2.0], [nan, nan, nan, nan], [-inf, 0.5, inf, -inf],
                      [-inf, -inf, -inf, -inf], [1.0, -inf, 1.01, -inf], [2.0, 1.0, 3.0, 0.5]],
                     device=device)
    noise = noise_for(6, 4, device) if training else None
    w, e = moeyard.sparsemixer(z, 0.01, training, noise=noise)
    assert ((e >= 0) & (e < 4)).all() and (e[:, 0] != e[:, 1]).all()
    assert w[:2].isnan().all() and w[3].isnan().all()  # a NaN: NaN weights, as torch.softmax
    assert w[2, 0].isnan() and w[2, 1] == 1  # +inf: slot 1's softmax is NaN, slot 2's is not
    assert w[4, 0].isfinite() and w[4, 1].isfinite() and w[5].isfinite().all()
    assert e[1].tolist() == [0, 1]  # all NaN: ties to the lower id
    assert sorted(e[4].tolist()) == [0, 2]  # -inf experts are never sampled over finite ones
    if not training:
        assert e[0].tolist() == [2, 3] and e[2].tolist() == [2, 1]  # NaN lowest
    assert_matches_reference((w, e), ref.sparsemixer(z, 0.01, noise))


# ---------------------------------------------------------------------------- op machinery


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    ops = torch.ops.moeyard
    z = logits_for(20, 12, 0.1, device).requires_grad_(requires_grad)
    noise = noise_for(20, 12, device)
    torch.library.opcheck(ops.sparsemixer.default, (z, 0.1, None))
    torch.library.opcheck(ops.sparsemixer.default, (z, 0.1, noise))
    _, e = ops.sparsemixer(z.detach(), 0.1, noise)
    grad = torch.randn(20, 2, device=device)
    torch.library.opcheck(ops._sparsemixer_backward.default, (grad, z.detach(), e, 0.1))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    T, E = 24, 8
    z = logits_for(T, E, 0.2, device).requires_grad_()
    noise = noise_for(T, E, device)

    def fn(v, n):
        w, e = moeyard.sparsemixer(v, 0.2, True, noise=n)
        return (w * (e + 1)).sum()

    want = torch.autograd.grad(fn(z, noise), z)[0]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(z, noise), z)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled(z, noise), fn(z, noise))


BAD = [
    (lambda: moeyard.sparsemixer(torch.randn(4, 1)), "at least 2 expert"),
    (lambda: moeyard.sparsemixer(torch.randn(8)), "2 dimensions"),
    (lambda: moeyard.sparsemixer(torch.randn(8), training=True), "2 dimensions"),
    (lambda: moeyard.sparsemixer(torch.randint(0, 3, (4, 8))), "floating-point"),
    (lambda: moeyard.sparsemixer(torch.randn(4, 8), -0.1), "jitter_eps"),
    (lambda: moeyard.sparsemixer(torch.randn(4, 8), float("nan")), "jitter_eps"),
    (lambda: moeyard.sparsemixer(torch.randn(4, 8), training=True, noise=torch.rand(4, 2, 8)),
     r"noise must have shape \[T, 2, E \+ 1\]"),
    (lambda: moeyard.sparsemixer(torch.randn(4, 8), training=True,
                                 noise=torch.rand(4, 2, 9, dtype=torch.float64)),
     "noise must be Float"),
    (lambda: moeyard.sparsemixer(torch.randn(4, 8), training=True,
                                 noise=torch.rand(4, 2, 9, device="meta")), "same device"),
    (lambda: torch.ops.moeyard._sparsemixer_backward(
        torch.randn(3, 2), torch.randn(3, 4), torch.tensor([[0, 1], [2, 4], [1, 0]],
                                                           dtype=torch.int32), 0.01),
     r"experts\[1, 1\] = 4"),
    (lambda: torch.ops.moeyard._sparsemixer_backward(
        torch.randn(3, 2), torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int64), 0.01),
     "experts must be Int"),
]


@pytest.mark.parametrize("fn,msg", BAD)
def test_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


def test_noise_needs_training():
    with pytest.raises(ValueError, match="only used in training"):
        moeyard.sparsemixer(torch.randn(4, 8), noise=torch.rand(4, 2, 9))


# ----------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T,E", [(1, 2), (333, 16), (257, 100), (64, 1024)])
def test_cuda_equals_cpu(dtype, T, E):
    """The same draws give the same experts on both devices, weights and gradients equal up to
    exp's rounding."""
    z = logits_for(T, E, 0.1, dtype=dtype)
    noise = noise_for(T, E)
    g = torch.randn(T, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for n in (None, noise):
        out = []
        for device in ("cpu", "cuda"):
            zd = z.to(device).requires_grad_()
            w, e = moeyard.sparsemixer(zd, 0.1, n is not None,
                                       noise=None if n is None else n.to(device))
            (grad,) = torch.autograd.grad((w * g.to(device)).sum(), zd)
            out.append((w.cpu(), e.cpu(), grad.cpu()))
        (w, e, grad), (wc, ec, gradc) = out
        assert torch.equal(e, ec)
        torch.testing.assert_close(wc, w, rtol=1e-5, atol=1e-6)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # gradients rounded to bf16
        torch.testing.assert_close(gradc.float(), grad.float(), rtol=tol, atol=tol)


@gpu
def test_cuda_graph_training_draws():
    """A training sparsemixer (noise drawn by the wrapper from the CUDA generator) and its
    backward captured in a CUDA graph: each replay draws fresh noise, as eager does after the
    same seed."""
    T, E = 256, 16
    z = logits_for(T, E, 0.1, "cuda").requires_grad_()
    g = torch.randn(T, 2, device="cuda")

    def step():
        w, e = moeyard.sparsemixer(z, 0.1, True)
        (grad,) = torch.autograd.grad((w * g).sum(), z)
        return w, e, grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    torch.cuda.manual_seed(11)
    graph.replay()
    first = [t.clone() for t in out]
    graph.replay()
    assert not torch.equal(out[1], first[1])  # fresh draws per replay
    torch.cuda.manual_seed(11)
    want = step()
    for a, b in zip(first, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
