"""update_expert_bias, router_losses, sequence_balance_loss, load_stats: kernels vs reference,
paper oracles, gradients, opcheck, bad input."""
import math

import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, random_experts, zipf_experts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64, torch.float32])
def test_update_expert_bias(device, load_dtype):
    bias = torch.randn(16, device=device)
    load = torch.randint(0, 100, (16,), device=device).to(load_dtype)
    want = bias.clone()
    ref.update_expert_bias(want, load, 1e-3)
    ptr = bias.data_ptr()
    moeyard.update_expert_bias(bias, load, 1e-3)
    assert bias.data_ptr() == ptr
    torch.testing.assert_close(bias, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_update_expert_bias_opcheck(device):
    bias = torch.randn(8, device=device)
    load = torch.randint(0, 9, (8,), device=device, dtype=torch.int32)
    torch.library.opcheck(torch.ops.moeyard.update_expert_bias.default, (bias, load, 1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_bias_balances_a_skewed_router(device):
    """Loss-Free Balancing oracle: a fixed skewed router becomes balanced; |b| <= steps * u."""
    T, E, k, u, steps = 4096, 8, 2, 3e-3, 400
    logits = torch.randn(T, E, device=device) + torch.linspace(0, 1, E, device=device)
    bias = torch.zeros(E, device=device)
    vio = []
    for _ in range(steps):
        _, experts = moeyard.route(logits, k, score="sigmoid", bias=bias)
        p = moeyard.plan(experts, E)
        vio.append(moeyard.load_stats(p)["max_violation"].item())
        moeyard.update_expert_bias(bias, p.counts, u)
    assert vio[0] > 0.5 and max(vio[-50:]) < 0.1
    assert bias.abs().max().item() <= steps * u + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("T,E,k", [(0, 4, 1), (1, 4, 1), (300, 8, 2), (1000, 64, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_losses_match_reference(device, dtype, T, E, k, score):
    logits = (torch.randn(T, E, device=device) * 3).to(dtype)
    counts = torch.randint(0, 50, (E,), device=device, dtype=torch.int32)
    got = moeyard.router_losses(logits, counts, k, score)
    want = ref.router_losses(logits, counts, k, score)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        assert a.shape == () and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_router_losses_oracles():
    """Uniform logits: z = (log E)^2, balance = 1 for balanced counts, E when one expert takes all."""
    E, T, k = 8, 64, 2
    logits = torch.zeros(T, E)
    lb, z = moeyard.router_losses(logits, torch.full((E,), T * k // E, dtype=torch.int32), k)
    assert math.isclose(lb.item(), 1.0, rel_tol=1e-6) and math.isclose(z.item(), math.log(E) ** 2, rel_tol=1e-6)
    hot = torch.full((T, E), -30.0)
    hot[:, 0] = 30.0
    counts = torch.zeros(E, dtype=torch.int32)
    counts[0] = T * k
    lb, _ = moeyard.router_losses(hot, counts, k)
    assert math.isclose(lb.item(), E, rel_tol=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_losses_gradcheck_and_opcheck(score):
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    counts = torch.randint(0, 5, (5,), dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda z: moeyard.router_losses(z, counts, 2, score),
                                    (logits,))
    op = torch.ops.moeyard.router_losses.default
    torch.library.opcheck(op, (logits, counts, 2, score))
    torch.library.opcheck(op, (logits.detach().float(), counts, 2, score))


def test_router_losses_sigmoid_oracle():
    """score="sigmoid": P is the mean of sigmoid(z) normalized per token, not the softmax; the
    sequence-wise loss of one sequence (same formula, counts from the experts) agrees."""
    T, E, k = 40, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    experts = moeyard.route(logits, k, "sigmoid")[1]
    counts = moeyard.plan(experts, E).counts
    s = torch.sigmoid(logits)
    want = E * ((counts.double() / (T * k)) * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    got, _ = moeyard.router_losses(logits, counts, k, "sigmoid")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, moeyard.sequence_balance_loss(s, experts, 1), rtol=1e-12,
                               atol=0)
    softmax, _ = moeyard.router_losses(logits, counts, k)
    assert not torch.allclose(softmax, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,S,E,k,p_none", [(1, 1, 4, 1, 0.0), (2, 50, 8, 2, 0.0), (4, 128, 64, 8, 0.1), (0, 5, 4, 2, 0.0)])
def test_sequence_balance_loss_matches_reference(device, dtype, B, S, E, k, p_none):
    scores = torch.sigmoid(torch.randn(B * S, E, device=device)).to(dtype)
    experts = random_experts(B * S, k, E, device, p_none)
    got = moeyard.sequence_balance_loss(scores, experts, max(B, 1))
    want = ref.sequence_balance_loss(scores, experts, max(B, 1))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_sequence_balance_loss_oracle_and_grad():
    """Perfectly balanced routing with uniform scores gives 1."""
    E, S = 4, 8
    experts = torch.tensor([[0, 1], [2, 3]] * (S // 2), dtype=torch.int32).repeat(3, 1)
    loss = moeyard.sequence_balance_loss(torch.full((3 * S, E), 0.5), experts, 3)
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-6)
    scores = torch.rand(12, 6, dtype=torch.float64, requires_grad=True)
    ex = random_experts(12, 2, 6)
    assert torch.autograd.gradcheck(lambda s: moeyard.sequence_balance_loss(s, ex, 3), (scores,))
    torch.library.opcheck(torch.ops.moeyard.sequence_balance_loss.default, (scores, ex, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_balance_loss_int64_ids_same_as_int32(device, dtype):
    """int64 ids (Hugging Face) give the loss and the gradient of the same ids in int32."""
    scores = torch.sigmoid(torch.randn(4 * 40, 8, device=device)).to(dtype).requires_grad_()
    experts = random_experts(4 * 40, 3, 8, device, p_none=0.2)
    losses, grads = [], []
    for ex in (experts, experts.long()):
        loss = moeyard.sequence_balance_loss(scores, ex, 4)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, scores)[0])
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    torch.library.opcheck(torch.ops.moeyard.sequence_balance_loss.default,
                          (scores, experts.long(), 4))


@pytest.mark.parametrize("bad", [8, -2, 2**31, 2**32 - 1, 2**32 + 1])
def test_sequence_balance_loss_bad_int64_ids(bad):
    experts = torch.zeros(6, 2, dtype=torch.int64)
    experts[4, 1] = bad
    with pytest.raises(RuntimeError, match=rf"experts\[4, 1\] = {bad} is out of range"):
        moeyard.sequence_balance_loss(torch.rand(6, 8), experts, 2)


def test_sequence_balance_loss_meta_takes_int32_and_int64_ids_only():
    """The fake kernel (shape propagation, torch.compile) accepts what the kernels accept."""
    scores = torch.rand(4, 3, device="meta")
    for dtype in (torch.int32, torch.int64):
        loss = moeyard.sequence_balance_loss(scores, torch.zeros(4, 1, dtype=dtype, device="meta"), 2)
        assert loss.shape == () and loss.dtype == torch.float32
    with pytest.raises(RuntimeError, match="int32 or int64"):
        moeyard.sequence_balance_loss(scores, torch.zeros(4, 1, device="meta"), 2)


def test_load_stats():
    experts = zipf_experts(1000, 2, 8)
    p = moeyard.plan(experts, 8, capacity=200)
    s = moeyard.load_stats(p)
    load = p.counts.float()
    assert math.isclose(s["max_violation"].item(), ((load.max() - load.mean()) / load.mean()).item(), rel_tol=1e-6)
    kept = (p.token_row >= 0).sum().item()
    assert math.isclose(s["dropped_fraction"].item(), 1 - kept / 2000, rel_tol=1e-6)


@pytest.mark.parametrize("fn,msg", [
    (lambda: moeyard.update_expert_bias(torch.zeros(4), torch.zeros(5), 1e-3), "load"),
    (lambda: moeyard.update_expert_bias(torch.zeros(4, dtype=torch.float64), torch.zeros(4), 1e-3), "bias"),
    (lambda: moeyard.router_losses(torch.randn(4, 3), torch.zeros(4, dtype=torch.int32), 1), "counts"),
    (lambda: moeyard.router_losses(torch.randn(4, 3), torch.zeros(3, dtype=torch.int32), 0), "k"),
    (lambda: moeyard.router_losses(torch.randn(4, 3), torch.zeros(3, dtype=torch.int32), 1,
                                   "relu"), "score"),
    (lambda: moeyard.sequence_balance_loss(torch.rand(6, 3), torch.zeros(6, 1, dtype=torch.int32), 4), "num_sequences|divide"),
    (lambda: moeyard.sequence_balance_loss(torch.rand(6, 3), torch.zeros(5, 1, dtype=torch.int32), 2), "experts"),
    (lambda: moeyard.sequence_balance_loss(torch.rand(6, 3), torch.zeros(6, 1), 2), "int32 or int64"),
])
def test_balance_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


def test_bias_balancer_recenter():
    """recenter=False is the paper's rule (update_expert_bias); recenter=True subtracts the
    update's mean (torchtitan), so the mean bias stays put and the differences are the same."""
    torch.manual_seed(0)
    layers = [moeyard.TopKMoE(16, 8, 8, k=2, bias_balancing=True) for _ in range(2)]
    load = torch.tensor([100, 10, 10, 10, 10, 10, 10, 10])  # one hot expert: 7 up, 1 down
    for layer in layers:
        layer.router.load_since_update.copy_(load)
    plain, centered = moeyard.BiasBalancer(layers[0], 1e-2), moeyard.BiasBalancer(layers[1], 1e-2,
                                                                                 recenter=True)
    plain.step(), centered.step()
    want = torch.zeros(8)
    moeyard.update_expert_bias(want, load, 1e-2)
    a, b = layers[0].router.e_score_correction_bias, layers[1].router.e_score_correction_bias
    assert torch.equal(a, want) and a.mean().abs() > 1e-4
    assert b.mean().abs() < 1e-8
    torch.testing.assert_close(b - b.mean(), a - a.mean(), rtol=0, atol=1e-7)
