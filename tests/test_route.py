"""route and relu_route: kernels vs reference.py, gradients, opcheck, NaN/Inf, bad input."""
import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES

CONFIGS = {
    "switch": dict(k=1),
    "qwen": dict(k=4),
    "mixtral": dict(k=2, topk_before_score=True),
    "mixtral_renorm": dict(k=2, renormalize=True),
    "sigmoid_scaled": dict(k=3, score="sigmoid", renormalize=True, scale=2.5),
    "biased": dict(k=2, bias=True),
    "deepseek": dict(k=4, score="sigmoid", bias=True, n_group=4, topk_group=2, renormalize=True,
                     scale=2.5),
    "groups_softmax": dict(k=3, n_group=8, topk_group=3),
    "none": dict(k=2, score="none"),
    "k_equals_E": dict(k=-1),
}


def _args(cfg, E, device):
    cfg = dict(cfg)
    if cfg.get("k") == -1:
        cfg["k"] = E
    if cfg.pop("bias", False):
        cfg["bias"] = 0.1 * torch.randn(E, device=device)
    return cfg


def _selection_values(logits, cfg):
    """Per token, the values route ranks (to find rows where rounding could swap a near-tie)."""
    z = logits.float()
    s = {"softmax": torch.softmax(z, -1), "sigmoid": torch.sigmoid(z)}.get(cfg.get("score", "softmax"), z)
    v = z if cfg.get("topk_before_score") or (cfg.get("bias") is None and cfg.get("n_group", 1) == 1) else s
    return v + cfg["bias"] if cfg.get("bias") is not None else v


def assert_route_matches(logits, cfg, got, want, tol):
    """Experts equal and weights close on every token whose top k+1 selection values are apart by
    more than rounding; at least 90% of tokens must qualify so the check is never vacuous."""
    (w, e), (w_ref, e_ref) = got, want
    assert w.dtype == w_ref.dtype and e.dtype == torch.int32 and e.shape == e_ref.shape
    T, k = e_ref.shape
    v = _selection_values(logits, cfg).cpu()
    gaps = torch.full((T,), float("inf"))
    G, tg = cfg.get("n_group", 1), cfg.get("topk_group", 1)
    if G > 1:  # the group choice must be clear too
        gv = v.view(T, G, v.shape[1] // G).topk(min(2, v.shape[1] // G), -1).values.sum(-1)
        gtop = gv.topk(min(tg + 1, G), -1)
        if tg < G:
            gaps = (gtop.values[:, tg - 1] - gtop.values[:, tg]).abs()
        keep = torch.zeros(T, G, dtype=torch.bool).scatter(1, gtop.indices[:, :tg], True)
        v = v.masked_fill(~keep.repeat_interleave(v.shape[1] // G, 1), float("-inf"))
    top = v.topk(min(k + 1, v.shape[1]), -1).values
    if top.shape[1] > 1:
        gaps = torch.minimum(gaps, (top[:, :-1] - top[:, 1:]).abs().min(-1).values)
    ok = gaps > 1e-6
    assert ok.float().mean() >= 0.9 or T < 10
    torch.testing.assert_close(e.cpu()[ok], e_ref.cpu()[ok], rtol=0, atol=0)
    torch.testing.assert_close(w.cpu()[ok], w_ref.cpu()[ok], rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,E", [(0, 8), (1, 8), (37, 16), (300, 64), (129, 160)])
def test_route_matches_reference(device, name, T, E):
    cfg = _args(CONFIGS[name], E, device)
    if cfg.get("n_group", 1) > 1 and E % cfg["n_group"]:
        pytest.skip("E not divisible by n_group")
    logits = torch.randn(T, E, device=device) * 2
    got = moeyard.route(logits, **cfg)
    want = ref.route(logits, **cfg)
    assert_route_matches(logits, cfg, got, want, tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_route_dtypes(device, dtype):
    cfg = _args(CONFIGS["deepseek"], 64, device)
    logits = torch.randn(200, 64, device=device).to(dtype)
    got = moeyard.route(logits, **cfg)
    want = ref.route(logits, **cfg)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_route_matches(logits, cfg, got, want, tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E", [512, 1000, 1024])
def test_route_large_experts(device, E):
    """E up to 1024 (the CUDA kernel's limit) and k = 16 with groups."""
    cfg = dict(k=16, score="sigmoid", bias=0.01 * torch.randn(E, device=device), n_group=8,
               topk_group=4, renormalize=True)
    logits = torch.randn(300, E, device=device)
    assert_route_matches(logits, cfg, moeyard.route(logits, **cfg), ref.route(logits, **cfg), 1e-6)
    w, e = moeyard.relu_route(logits)  # k_max = E: every round of the top-k loop
    w_ref, e_ref = ref.relu_route(logits, E)
    assert torch.equal(e.cpu(), e_ref.cpu()) and torch.equal(w.cpu(), w_ref.cpu())


def test_route_ties_go_to_lower_index():
    logits = torch.zeros(3, 6)
    w, e = moeyard.route(logits, 3)
    assert e.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 6))


def test_route_bias_changes_selection_not_weights():
    logits = torch.randn(64, 8)
    bias = torch.zeros(8)
    bias[7] = 100.0  # expert 7 always selected
    w, e = moeyard.route(logits, 2, score="sigmoid", bias=bias)
    assert (e[:, 0] == 7).all()
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, e.long()))


def test_mixtral_equivalence():
    """softmax -> top-k -> renormalize equals top-k on logits -> softmax over the k."""
    logits = torch.randn(100, 8)
    a = moeyard.route(logits, 2, renormalize=True)
    b = moeyard.route(logits, 2, topk_before_score=True)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_group_limit_excludes_groups():
    """With negative biases HF's 0-fill would leak; moeyard must pick only from kept groups."""
    E, G = 16, 4
    logits = torch.randn(50, E)
    bias = torch.full((E,), -5.0)
    w, e = moeyard.route(logits, 2, score="sigmoid", bias=bias, n_group=G, topk_group=1)
    groups = e.long() // (E // G)
    assert (groups == groups[:, :1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_route_nan_inf(device):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, nan, 3.0, 2.0], [nan, nan, nan, nan], [-inf, 0.5, inf, -inf]],
                          device=device)
    w, e = moeyard.route(logits, 2, score="sigmoid")
    assert e.tolist() == [[2, 3], [0, 1], [2, 1]]  # NaN lowest, ties to the lower index
    assert w[0].isfinite().all() and w[1].isnan().all() and w[2, 0] == 1.0
    w, e = moeyard.route(logits, 4)  # softmax: a NaN or +inf logit makes the token's weights NaN
    assert sorted(e[1].tolist()) == [0, 1, 2, 3] and w[:2].isnan().all() and w[2].isnan().all()
    assert ((e >= 0) & (e < 4)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_max", [1, 3, 8])
def test_relu_route(device, k_max):
    logits = torch.randn(300, 8, device=device)
    w, e = moeyard.relu_route(logits, k_max)
    w_ref, e_ref = ref.relu_route(logits, k_max)
    assert torch.equal(e.cpu(), e_ref.cpu())
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    active = (logits > 0).sum(1).clamp(max=k_max)
    assert torch.equal((e >= 0).sum(1), active)


def test_relu_route_default_keeps_every_active_expert():
    logits = torch.randn(40, 6)
    w, e = moeyard.relu_route(logits)
    dense = torch.zeros_like(logits).scatter_add(1, e.long().clamp(min=0), w)
    torch.testing.assert_close(dense, torch.relu(logits))


GRAD_CONFIGS = ["switch", "qwen", "mixtral", "mixtral_renorm", "sigmoid_scaled", "deepseek", "none"]


@pytest.mark.parametrize("name", GRAD_CONFIGS)
def test_route_gradcheck(name):
    cfg = _args(CONFIGS[name], 8, "cpu")
    logits = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: moeyard.route(z, **cfg)[0], (logits,))


def test_relu_route_gradcheck():
    logits = torch.randn(6, 8, dtype=torch.float64)
    logits = (logits + 0.2 * logits.sign()).requires_grad_()  # keep clear of the kink at 0
    assert torch.autograd.gradcheck(lambda z: moeyard.relu_route(z, 5)[0], (logits,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qwen", "mixtral", "deepseek"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_route_opcheck(device, name, requires_grad):
    cfg = _args(CONFIGS[name], 16, device)
    logits = torch.randn(20, 16, device=device, requires_grad=requires_grad)
    args = (logits, cfg["k"], cfg.get("score", "softmax"), cfg.get("topk_before_score", False),
            cfg.get("bias"), cfg.get("n_group", 1), cfg.get("topk_group", 1),
            cfg.get("renormalize", False), cfg.get("scale", 1.0))
    torch.library.opcheck(torch.ops.moeyard.route.default, args)
    torch.library.opcheck(torch.ops.moeyard.relu_route.default, (logits, 4))


BAD = [
    (lambda: moeyard.route(torch.randn(4, 8), 0), "k must be in"),
    (lambda: moeyard.route(torch.randn(4, 8), 9), "k must be in"),
    (lambda: moeyard.route(torch.randn(8), 2), "2 dimensions"),
    (lambda: moeyard.route(torch.randint(0, 3, (4, 8)), 2), "floating-point"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, "tanh"), "score must be"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, "sigmoid", topk_before_score=True), "softmax"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, n_group=3), "divide E"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, n_group=4, topk_group=5), "topk_group"),
    (lambda: moeyard.route(torch.randn(4, 8), 5, n_group=4, topk_group=2), "exceeds"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, bias=torch.zeros(7)), "bias must have"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, bias=torch.zeros(8, dtype=torch.float64)),
     "bias must be"),
    (lambda: moeyard.route(torch.randn(4, 8), 2, scale=float("nan")), "scale must be finite"),
    (lambda: moeyard.relu_route(torch.randn(4, 8), 0), "k must be in"),
]


@pytest.mark.parametrize("fn,msg", BAD)
def test_route_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()
