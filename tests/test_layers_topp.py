"""TopPMoE against a naive pure-PyTorch layer on the same weights (forward, backward, balance and
entropy losses, stats), variable experts per token, the entropy loss lowering the experts per
token, torch.compile and bad configurations."""
import pytest
import torch
import torch.nn.functional as F

import moeyard
from conftest import DEVICES, check_layer_against, expert_out, fwd_bwd, run_layer

D, I, E, B, S = 16, 8, 8, 2, 12  # tokens T = B * S = 24

CONFIGS = {
    "topp": lambda **kw: moeyard.TopPMoE(D, I, E, **kw),
    "topp_kmax": lambda **kw: moeyard.TopPMoE(D, I, E, p=0.6, k_max=3, activation="gelu",
                                              expert_bias=True, z_loss_coef=1e-3, **kw),
    "topp_p1": lambda **kw: moeyard.TopPMoE(D, I, E, p=1.0, entropy_loss_coef=0.5, **kw),
}


def make(name, device="cpu", dtype=torch.float32, **kw):
    layer = CONFIGS[name](initializer_range=0.2, **kw).to(device=device, dtype=dtype)
    ex = layer.experts
    if ex.gate_up_proj_bias is not None:
        with torch.no_grad():
            ex.gate_up_proj_bias.normal_(std=0.1), ex.down_proj_bias.normal_(std=0.1)
    return layer


def naive_topp(layer, x):
    """(out, aux_losses, stats): the authors' rule on the softmax (sorted, cumsum > p, the crossing
    expert kept), raw probabilities as weights, one expert at a time; Switch balance loss with
    f_e = fraction of tokens that selected e; mean routing entropy."""
    h = x.reshape(-1, D)
    T = h.shape[0]
    logits = F.linear(h.float(), layer.router.weight.float())
    probs = torch.softmax(logits, -1)
    sorted_p, idx = probs.detach().sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p
    kept_sorted = (before <= layer.p) | (layer.p >= 1)
    kept_sorted[:, layer.k_max:] = False
    kept = torch.zeros_like(kept_sorted).scatter(1, idx, kept_sorted)
    out = torch.zeros(T, D, device=h.device)
    for e in range(E):
        tok = torch.nonzero(kept[:, e]).flatten()
        out = out.index_add(0, tok, probs[tok, e, None] * expert_out(layer.experts, e, h[tok]))
    counts = kept.sum(0)
    losses = {}
    if layer.aux_loss_coef > 0:
        f = counts.float() / max(T, 1)
        losses["balance"] = layer.aux_loss_coef * E * (f * probs.mean(0)).sum()
    if layer.z_loss_coef > 0:
        losses["z"] = layer.z_loss_coef * (torch.logsumexp(logits, -1) ** 2).mean()
    if layer.entropy_loss_coef > 0:
        losses["entropy"] = layer.entropy_loss_coef * -(probs * probs.log()).sum(-1).mean()
    mean = counts.float().mean()
    stats = {"tokens_per_expert": counts, "max_violation": (counts.max() - mean) / mean,
             "dropped_fraction": torch.zeros(()), "experts_per_token": counts.sum() / T}
    return out.to(x.dtype).view(x.shape), losses, stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_naive(name, training, dtype, device):
    layer = make(name, device, dtype).train(training)
    x = torch.randn(B, S, D, device=device).to(dtype)
    g = torch.randn(B, S, D, device=device)
    check_layer_against(layer, lambda v: naive_topp(layer, v), x, g)


def test_tokens_get_variable_experts():
    layer = make("topp")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # x[:, 0] = 1: expert 0 has ~all the mass
    x = torch.zeros(2, D)
    x[0, 0] = 1.0  # confident token: one expert
    layer(x)       # token 1: uniform, p = 0.4 over 8 experts needs 4 (0, 1/8, 2/8, 3/8 <= 0.4)
    _, weights, experts = layer.router(x)
    assert ((experts >= 0).sum(1) == torch.tensor([1, 4])).all()
    torch.testing.assert_close(layer.last_stats["experts_per_token"], torch.tensor(2.5))
    torch.testing.assert_close(weights[1, :4], torch.full((4,), 1 / 8))  # not renormalized


def test_entropy_loss_lowers_the_experts_per_token():
    """The paper's point of L_dynamic: minimizing the entropy sharpens the router, so top-p
    selects fewer experts (only the entropy loss is trained here)."""
    torch.manual_seed(0)
    layer = moeyard.TopPMoE(D, I, E, p=0.4, aux_loss_coef=0.0, entropy_loss_coef=1.0)
    x = torch.randn(64, D)
    layer(x)
    start = layer.last_stats["experts_per_token"].item()
    opt = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    for _ in range(50):
        layer(x)
        opt.zero_grad()
        layer.aux_losses["entropy"].backward()
        opt.step()
    layer(x)
    assert start > 2.5 and layer.last_stats["experts_per_token"].item() < 1.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["topp", "topp_kmax"])
def test_compile_fullgraph_matches_eager(name, device):
    torch._dynamo.reset()
    layer = make(name, device)
    x = torch.randn(B, S, D, device=device)
    g = torch.randn(B, S, D, device=device)
    eager = fwd_bwd(run_layer(layer), layer, x, g), dict(layer.last_stats)
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    (out, losses, grads), stats = fwd_bwd(run_layer(compiled_layer), layer, x, g), layer.last_stats
    (e_out, e_losses, e_grads), e_stats = eager
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(losses, e_losses)
    for a, b in zip(grads, e_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(stats, e_stats)


def test_empty_batch_and_collect():
    layer = make("topp")
    x = torch.randn(0, S, D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    (out.sum() + moeyard.collect_aux_losses(layer)).backward()
    assert layer.last_stats["experts_per_token"] == 0
    assert all(torch.isfinite(v).all() for v in layer.last_stats.values())
    layer(torch.randn(3, D))
    assert set(layer.aux_losses) == {"balance", "entropy"}
    torch.testing.assert_close(moeyard.collect_aux_losses(layer),
                               layer.aux_losses["balance"] + layer.aux_losses["entropy"])


def test_defaults_and_repr():
    layer = moeyard.TopPMoE(D, I, E)
    assert (layer.p, layer.k_max, layer.aux_loss_coef, layer.entropy_loss_coef) == \
        (0.4, E, 1e-2, 1e-4)
    assert "p=0.4" in repr(layer) and "k_max=8" in repr(layer)


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=0.0), "p=0.0"),
    (dict(p=1.5), "p=1.5"),
    (dict(k_max=0), "k_max=0"),
    (dict(k_max=9), "k_max=9"),
    (dict(entropy_loss_coef=-1.0), "entropy_loss_coef"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(activation="tanh"), "activation"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeyard.TopPMoE(D, I, E, **kwargs)
