"""erc_loss (expert-router coupling, arXiv 2512.23447 §3) against an independent fp64 computation
written from the paper's equations, the noise bound of its §3.2 / Appendix B, determinism given a
torch.Generator, gradients, Experts.gate_weight, the TopKMoE option and bad input."""
import math

import pytest
import torch

import moeyard
from conftest import DEVICES


def paper_erc(R, W, alpha, u):
    """Eq. 3 with Eq. 4 at its bound, literally, in fp64 loops: R [n, d], W [n, D, d] (expert j's
    W_g^j is W[j].T), u [n, d] the uniform draws in [0, 1) (delta = 1 - eps + 2 eps u)."""
    n = R.shape[0]
    eps = []
    for i in range(n):
        others = [torch.sqrt(((R[i] - R[j]) ** 2).sum()) for j in range(n) if j != i]
        eps.append(min(others).item() / (2 * R[i].norm().item()) if others else 0.0)
    eps = torch.tensor(eps, dtype=torch.float64)
    delta = (1 - eps[:, None] + 2 * eps[:, None] * u).detach()  # noise: no gradient
    proxy = R * delta
    M = torch.stack([torch.stack([(proxy[i] @ W[j].T).norm() for j in range(n)])
                     for i in range(n)])
    total = M.sum() * 0
    for i in range(n):
        for j in range(n):
            if j != i:
                total = total + torch.clamp(M[i, j] - alpha * M[i, i], min=0) \
                    + torch.clamp(M[j, i] - alpha * M[i, i], min=0)
    return total / n**2, proxy, eps


def draws(seed, shape, device="cpu", dtype=torch.float64):
    """The uniform draws erc_loss makes from a generator seeded `seed` (in R's math dtype)."""
    return torch.rand(shape, generator=torch.Generator(device).manual_seed(seed), dtype=dtype,
                      device=device).double()


@pytest.mark.parametrize("n,d,D,alpha", [(2, 3, 4, 1.0), (5, 8, 6, 0.5), (8, 16, 12, 0.0),
                                         (1, 4, 3, 1.0)])
def test_erc_matches_paper_equations_fp64(n, d, D, alpha):
    R = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, D, d, dtype=torch.float64, requires_grad=True)
    got = moeyard.erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(7))
    want, _, _ = paper_erc(R, W, alpha, draws(7, (n, d)))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if n > 1:
        assert got > 0  # random weights are not coupled
    g_got = torch.autograd.grad(got, (R, W), allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(want, (R, W), allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_erc_fp32_for_low_precision_parameters():
    R, W = torch.randn(6, 16).bfloat16(), torch.randn(6, 10, 16).bfloat16()
    got = moeyard.erc_loss(R, W, generator=torch.Generator().manual_seed(1))
    want = moeyard.erc_loss(R.float(), W.float(), generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    want, _, _ = paper_erc(R.double(), W.double(), 1.0, draws(1, (6, 16), dtype=torch.float32))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_erc_noise_keeps_proxies_in_their_cluster():
    """§3.2 / Appendix B: with eps_i = ||R_i - R_j*|| / (2 ||R_i||), every proxy stays closer to
    its own centre than to any other, for every draw, including the extreme ones."""
    n, d = 12, 6
    R = torch.randn(n, d, dtype=torch.float64) * torch.rand(n, 1, dtype=torch.float64) * 3
    for u in (draws(3, (n, d)), torch.zeros(n, d, dtype=torch.float64),
              torch.ones(n, d, dtype=torch.float64), torch.randint(0, 2, (n, d)).double()):
        _, proxy, eps = paper_erc(R, torch.randn(n, 2, d, dtype=torch.float64), 1.0, u)
        dist = torch.cdist(proxy, R)
        own = dist.diagonal()
        others = dist + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))
        assert (own <= others.min(1).values + 1e-12).all()
        assert (eps > 0).all()


def test_erc_deterministic_given_the_generator_and_noisy():
    R, W = torch.randn(8, 16), torch.randn(8, 12, 16)
    a = moeyard.erc_loss(R, W, generator=torch.Generator().manual_seed(5))
    b = moeyard.erc_loss(R, W, generator=torch.Generator().manual_seed(5))
    c = moeyard.erc_loss(R, W, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    first, second = moeyard.erc_loss(R, W, generator=g), moeyard.erc_loss(R, W, generator=g)
    assert torch.equal(first, a) and not torch.equal(second, a)  # the generator advances


def test_erc_coupled_weights_give_zero_and_swapped_ones_do_not():
    """Expert j's input projection reads only coordinate j, and R's rows are the coordinate axes:
    each proxy activates only its own expert (loss 0 for any alpha >= 0). Swapping two experts'
    projections breaks the coupling."""
    n = 4
    R = torch.eye(n, dtype=torch.float64) * 2
    W = torch.zeros(n, 3, n, dtype=torch.float64)
    for j in range(n):
        W[j, :, j] = torch.tensor([1.0, -2.0, 0.5])
    for alpha in (0.0, 0.5, 1.0):
        assert moeyard.erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(0)) == 0
    swapped = W[[1, 0, 2, 3]]
    assert moeyard.erc_loss(R, swapped, generator=torch.Generator().manual_seed(0)) > 0


def test_erc_gradcheck_gate_weights():
    """gradcheck w.r.t. W_g (the noise does not depend on it). For R the noise level depends on R
    without a gradient by design, so R's gradient is checked against the fp64 equations above."""
    R = torch.randn(4, 5, dtype=torch.float64)
    W = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: moeyard.erc_loss(R, w, 0.7, generator=torch.Generator().manual_seed(2)), (W,))


def test_erc_single_expert_and_zero_rows_are_finite():
    R = torch.randn(1, 4, requires_grad=True)
    W = torch.randn(1, 3, 4, requires_grad=True)
    loss = moeyard.erc_loss(R, W)
    loss.backward()
    assert loss == 0 and torch.isfinite(R.grad).all() and torch.isfinite(W.grad).all()
    R = torch.zeros(3, 4, requires_grad=True)
    loss = moeyard.erc_loss(R, torch.randn(3, 2, 4))
    loss.backward()
    assert loss == 0 and torch.isfinite(R.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_erc_device_and_generator_device(device):
    R, W = torch.randn(6, 8, device=device), torch.randn(6, 5, 8, device=device)
    a = moeyard.erc_loss(R, W, generator=torch.Generator(device).manual_seed(3))
    u = draws(3, (6, 8), device, torch.float32).cpu()
    want, _, _ = paper_erc(R.double().cpu(), W.double().cpu(), 1.0, u)
    assert a.device.type == device
    torch.testing.assert_close(a.double().cpu(), want, rtol=1e-5, atol=1e-6)
    if device == "cuda":  # a CPU generator: drawn on the CPU, moved
        b = moeyard.erc_loss(R, W, generator=torch.Generator().manual_seed(3))
        u = draws(3, (6, 8), "cpu", torch.float32)
        want, _, _ = paper_erc(R.double().cpu(), W.double().cpu(), 1.0, u)
        torch.testing.assert_close(b.double().cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4), torch.randn(4, 2, 4)), "router_weight must be"),
    ((torch.randn(4, 3), torch.randn(4, 3)), "router_weight must be"),
    ((torch.randn(4, 3), torch.randn(5, 2, 3)), "gate_weight must be"),
    ((torch.randn(4, 3), torch.randn(4, 2, 4)), "gate_weight must be"),
    ((torch.randn(4, 3), torch.randn(4, 2, 3), -0.5), "alpha"),
    ((torch.randn(4, 3), torch.randn(4, 2, 3), float("nan")), "alpha"),
])
def test_erc_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        moeyard.erc_loss(*args)


# ------------------------------------------------------------------------ Experts.gate_weight


@pytest.mark.parametrize("activation,rows", [("swiglu", slice(0, 5)), ("geglu", slice(0, 5)),
                                             ("swiglu_oss", slice(0, 10, 2)),
                                             ("gelu", slice(0, 5)), ("relu", slice(0, 5))])
def test_gate_weight_rows(activation, rows):
    ex = moeyard.Experts(3, 4, 5, activation)
    gw = ex.gate_weight
    assert gw.shape == (3, 5, 4)
    assert torch.equal(gw, ex.gate_up_proj[:, rows])
    assert gw.data_ptr() == ex.gate_up_proj[:, rows].data_ptr()  # a view: gradients reach it


# ---------------------------------------------------------------------------- TopKMoE option


def test_topk_erc_option_adds_the_loss_in_training_only():
    D, I, E = 16, 8, 6
    layer = moeyard.TopKMoE(D, I, E, 2, erc_loss_coef=0.5, erc_alpha=0.8, aux_loss_coef=0.0,
                            erc_generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 5, D)
    layer(x)
    want = 0.5 * moeyard.erc_loss(layer.router.weight, layer.experts.gate_weight, 0.8,
                                  generator=torch.Generator().manual_seed(4))
    assert set(layer.aux_losses) == {"erc"}
    torch.testing.assert_close(layer.aux_losses["erc"], want)
    layer.aux_losses["erc"].backward()
    # the loss reaches the router and the gate rows of gate_up_proj, not the up rows
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad[:, :I].abs().sum() > 0
    assert (layer.experts.gate_up_proj.grad[:, I:] == 0).all()
    layer.eval()
    layer(x)
    assert "erc" not in layer.aux_losses
    assert "erc_loss_coef=0.5" in repr(layer)
    plain = moeyard.TopKMoE(D, I, E, 2)
    plain(x)
    assert "erc" not in plain.aux_losses


@pytest.mark.parametrize("kwargs,match", [(dict(erc_loss_coef=-1.0), "erc_loss_coef"),
                                          (dict(erc_alpha=-0.1), "erc_alpha"),
                                          (dict(erc_loss_coef=1.0, ep_group=object()),
                                           "ep_group")])
def test_topk_erc_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeyard.TopKMoE(16, 8, 4, 2, **kwargs)
