"""top_p_route (dynamic top-p routing): kernels vs reference.py and vs the authors' selection rule,
the rule on hand-made distributions (crossing expert kept, raw weights, ties, p = 1, k_max),
NaN/Inf, dtypes, gradients, opcheck, torch.compile, CUDA graphs, bad input; and router_entropy,
the paper's dynamic loss."""
import math

import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES


def authors_rule(logits, p):
    """The selection of ZhenweiAn/Dynamic_MoE's top_p_sampling_batched_all_sequence, restated:
    sort the probabilities descending, cumsum, mask = cumsum > p, the first masked position (the
    crossing expert) unmasked again. Returns a dense [T, E] weight matrix (raw probabilities)."""
    probs = torch.softmax(logits.double(), -1)
    sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
    cum = sorted_p.cumsum(-1)
    mask = cum > p
    first = mask.long().argmax(-1)
    mask &= ~torch.nn.functional.one_hot(first, probs.shape[1]).bool()
    kept = torch.where(mask, 0.0, sorted_p)
    return torch.zeros_like(probs).scatter(1, idx, kept)


def dense(weights, experts, E):
    """[T, E] weights of a routing with -1 slots."""
    keep = experts >= 0
    w = torch.where(keep, weights.double(), 0.0)
    return torch.zeros(weights.shape[0], E, dtype=torch.float64, device=weights.device).scatter_add(
        1, experts.long().clamp(min=0), w)


def clear_tokens(logits, p, margin=1e-5):
    """Tokens whose running sums stay more than `margin` away from p, so that rounding cannot
    change the selection. (The order needs no margin: it compares the logits themselves.)"""
    probs = torch.softmax(logits.double(), -1)
    if p >= 1:  # every slot kept, whatever the sums
        return torch.ones(probs.shape[0], dtype=torch.bool)
    s, _ = probs.sort(dim=-1, descending=True)
    before = s.cumsum(-1) - s
    return ((before - p).abs() > margin).all(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.4, 0.75, 1.0])
@pytest.mark.parametrize("T,E,k_max", [(0, 8, None), (1, 8, None), (37, 16, None), (300, 64, 5),
                                       (129, 160, None), (64, 1, None)])
def test_top_p_matches_reference_and_authors_rule(device, p, T, E, k_max):
    logits = torch.randn(T, E, device=device) * 2
    w, e = moeyard.top_p_route(logits, p, k_max)
    k = E if k_max is None else k_max
    assert w.shape == e.shape == (T, k) and w.dtype == torch.float32 and e.dtype == torch.int32
    w_ref, e_ref = ref.top_p_route(logits, p, k)
    ok = clear_tokens(logits.cpu(), p)
    assert ok.float().mean() >= 0.9 or T < 10
    assert torch.equal(e.cpu()[ok], e_ref.cpu()[ok])
    torch.testing.assert_close(w.cpu()[ok], w_ref.cpu()[ok], rtol=1e-6, atol=1e-6)
    # the -1 slots come after the used ones, with weight 0; at least one expert per token
    used = e >= 0
    assert torch.equal(used, used.cumprod(-1).bool()) and (used[:, 0].all() or T == 0)
    assert (w[~used] == 0).all() and ((e < E) & (e >= -1)).all()
    if k_max is None:  # unbounded: exactly the authors' selection and weights
        torch.testing.assert_close(dense(w, e, E).cpu()[ok], authors_rule(logits.cpu(), p)[ok],
                                   rtol=1e-6, atol=1e-6)


def test_crossing_expert_kept_and_weights_not_renormalized():
    probs = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1],    # 0.3 <= 0.4: the crossing 0.25 is kept
                          [0.05, 0.6, 0.2, 0.1, 0.05],    # 0.6 crosses at once: one expert
                          [0.1, 0.1, 0.1, 0.1, 0.6]])
    w, e = moeyard.top_p_route(probs.log(), 0.4)
    assert e.tolist() == [[0, 1, -1, -1, -1], [1, -1, -1, -1, -1], [4, -1, -1, -1, -1]]
    torch.testing.assert_close(w[:, :2], torch.tensor([[0.3, 0.25], [0.6, 0.0], [0.6, 0.0]]))
    w, e = moeyard.top_p_route(probs.log(), 0.7)  # 0.3 + 0.25 = 0.55 <= 0.7: a third expert
    assert e[0].tolist() == [0, 1, 2, -1, -1] and e[1].tolist() == [1, 2, -1, -1, -1]


def test_ties_go_to_lower_index_and_p_one_keeps_all():
    w, e = moeyard.top_p_route(torch.zeros(3, 6), 0.4)  # 1/6 each: 0, 1/6, 2/6 <= 0.4 < 3/6
    assert e.tolist() == [[0, 1, 2, -1, -1, -1]] * 3
    torch.testing.assert_close(w[:, :3], torch.full((3, 3), 1 / 6))
    logits = torch.randn(20, 6)
    logits[:, 5] = -float("inf")  # probability 0: still kept by p = 1
    w, e = moeyard.top_p_route(logits, 1.0)
    assert torch.equal(e.sort(-1).values, torch.arange(6, dtype=torch.int32).expand(20, 6))
    torch.testing.assert_close(w.sum(-1), torch.ones(20))


def test_k_max_bounds_the_experts():
    logits = torch.zeros(4, 8)  # flat: p = 0.9 wants 8 experts
    w, e = moeyard.top_p_route(logits, 0.9, 3)
    assert e.tolist() == [[0, 1, 2]] * 4 and (w == 1 / 8).all()


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_nan_inf(device):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, nan, 3.0, 2.0], [nan, nan, nan, nan], [-inf, 0.5, inf, -inf],
                           [-inf, -inf, -inf, -inf], [0.0, 5.0, -inf, 0.0]], device=device)
    w, e = moeyard.top_p_route(logits, 0.5)
    assert e[:, 0].tolist() == [2, 0, 2, 0, 1] and (e[:4, 1:] == -1).all()  # NaN lowest
    assert w[:4, 0].isnan().all() and (w[:4, 1:] == 0).all()  # NaN probabilities: one expert
    assert e[4].tolist() == [1, -1, -1, -1] and w[4, 0] > 0.98  # -inf logit: probability 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_top_p_dtypes(device, dtype):
    logits = (torch.randn(200, 64, device=device) * 2).to(dtype)
    w, e = moeyard.top_p_route(logits, 0.4)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    w_ref, e_ref = ref.top_p_route(logits, 0.4, 64)
    ok = clear_tokens(logits.cpu(), 0.4)
    assert ok.float().mean() >= 0.9
    assert torch.equal(e.cpu()[ok], e_ref.cpu()[ok])
    torch.testing.assert_close(w.cpu()[ok], w_ref.cpu()[ok], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E", [512, 1000, 1024])
def test_top_p_large_experts(device, E):
    """E up to 1024 (the CUDA kernel's limit): p = 1 walks every slot of the loop."""
    logits = torch.randn(100, E, device=device)
    for p in (0.3, 1.0):
        w, e = moeyard.top_p_route(logits, p)
        w_ref, e_ref = ref.top_p_route(logits, p, E)
        ok = clear_tokens(logits.cpu(), p)
        assert torch.equal(e.cpu()[ok], e_ref.cpu()[ok])
        torch.testing.assert_close(w.cpu()[ok], w_ref.cpu()[ok], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k_max", [None, 3])
def test_top_p_gradcheck(k_max):
    g = torch.Generator().manual_seed(0)
    while True:  # logits whose selection no step of gradcheck can change
        logits = torch.randn(6, 8, dtype=torch.float64, generator=g) * 2
        if clear_tokens(logits, 0.5, margin=1e-3).all():
            break
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: moeyard.top_p_route(z, 0.5, k_max)[0], (logits,))
    # the gradient is the softmax's through the kept slots only
    w, e = moeyard.top_p_route(logits, 0.5, k_max)
    gw = torch.randn_like(w)
    (got,) = torch.autograd.grad((w * gw).sum(), logits)
    s = torch.softmax(logits, -1)
    want_w = torch.where(e >= 0, s.gather(1, e.long().clamp(min=0)), 0.0)
    (want,) = torch.autograd.grad((want_w * gw).sum(), logits)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_top_p_opcheck(device, requires_grad):
    logits = torch.randn(20, 16, device=device, requires_grad=requires_grad)
    for p, k_max in ((0.4, 16), (1.0, 5), (0.05, 1)):
        torch.library.opcheck(torch.ops.moeyard.top_p_route.default, (logits, p, k_max))


def test_top_p_compile_fullgraph_and_plan():
    torch._dynamo.reset()

    def f(logits):
        w, e = moeyard.top_p_route(logits, 0.4)
        p = moeyard.plan(e, logits.shape[1])
        return w, e, p.counts, p.token_row

    logits = torch.randn(32, 8, requires_grad=True)
    want = f(logits)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    w, e, counts, token_row = want
    assert counts.sum() == (e >= 0).sum()  # the plan skips the -1 slots
    assert torch.equal(token_row >= 0, e >= 0)


def test_top_p_feeds_expert_ffn():
    """plan and expert_ffn take the routing unchanged: the output is the sum over the kept experts
    of P_e * expert_e(x)."""
    T, E, d, I = 40, 6, 8, 5
    x = torch.randn(T, d)
    w, e = moeyard.top_p_route(torch.randn(T, E) * 2, 0.5)
    gate_up, down = torch.randn(E, 2 * I, d) / 3, torch.randn(E, d, I) / 3
    out = moeyard.expert_ffn(x, moeyard.plan(e, E), w, gate_up, down)
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(E):
            if e[t, j] >= 0:
                h = gate_up[e[t, j]] @ x[t]
                a = torch.nn.functional.silu(h[:I]) * h[I:]
                want[t] += w[t, j] * (down[e[t, j]] @ a)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_top_p_cuda_graph_capture_and_replay():
    logits = torch.randn(512, 64, device="cuda")
    moeyard.top_p_route(logits, 0.4)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moeyard.top_p_route(logits, 0.4)
    for _ in range(3):
        logits.copy_(torch.randn_like(logits) * 3)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(static_out, moeyard.top_p_route(logits, 0.4)):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_top_p_cuda_matches_cpu():
    logits = torch.randn(1000, 48) * 2
    w, e = moeyard.top_p_route(logits.cuda(), 0.4)
    w_cpu, e_cpu = moeyard.top_p_route(logits, 0.4)
    ok = clear_tokens(logits, 0.4)
    assert ok.float().mean() >= 0.9
    assert torch.equal(e.cpu()[ok], e_cpu[ok])
    torch.testing.assert_close(w.cpu()[ok], w_cpu[ok], rtol=1e-6, atol=1e-6)


BAD = [
    (lambda: moeyard.top_p_route(torch.randn(4, 8), 0.0), "p must be in"),
    (lambda: moeyard.top_p_route(torch.randn(4, 8), 1.5), "p must be in"),
    (lambda: moeyard.top_p_route(torch.randn(4, 8), float("nan")), "p must be in"),
    (lambda: moeyard.top_p_route(torch.randn(4, 8), 0.4, 0), "k_max must be in"),
    (lambda: moeyard.top_p_route(torch.randn(4, 8), 0.4, 9), "k_max must be in"),
    (lambda: moeyard.top_p_route(torch.randn(8), 0.4, 2), "2 dimensions"),
    (lambda: moeyard.top_p_route(torch.randint(0, 3, (4, 8)), 0.4), "floating-point"),
    (lambda: moeyard.top_p_route(torch.randn(4, 0), 0.4, 1), "at least one expert"),
]


@pytest.mark.parametrize("fn,msg", BAD)
def test_top_p_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


# ------------------------------------------------------------------------------ router_entropy


def test_router_entropy_matches_fp64_and_oracles():
    logits = torch.randn(50, 8) * 3
    p = torch.exp(logits.double()) / torch.exp(logits.double()).sum(-1, keepdim=True)
    want = -(p * p.log()).sum(-1).mean()
    got = moeyard.router_entropy(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moeyard.router_entropy(torch.zeros(5, 8)), torch.tensor(math.log(8)))
    assert moeyard.router_entropy(torch.zeros(0, 8)) == 0


def test_router_entropy_underflow_is_finite():
    logits = torch.tensor([[0.0, -float("inf"), -1e4, 1.0]], requires_grad=True)
    h = moeyard.router_entropy(logits)
    h.backward()
    p = torch.softmax(torch.tensor([0.0, 1.0]), -1)
    torch.testing.assert_close(h.detach(), -(p * p.log()).sum())
    assert torch.isfinite(logits.grad).all() and (logits.grad[0, 1:3] == 0).all()


def test_router_entropy_gradcheck():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moeyard.router_entropy, (logits,))
