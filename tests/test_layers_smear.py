"""SmearMoE against a naive pure-PyTorch SMEAR on the same weights (explicit per-example merged
weights; forward, backward, stats) in train (expert dropout off, or the same dropout mask) and
eval, the masked routing mean, [T, d] inputs, a few Adam steps, state_dict, torch.compile and bad
configurations."""
import math

import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, check_layer_against, close, fwd_bwd

D, I, E, B, S = 16, 8, 4, 3, 10

CONFIGS = {
    "swiglu": dict(),
    "silu_bias": dict(activation="silu", expert_bias=True),  # SMEAR's swish adapters
    "gelu": dict(activation="gelu"),
    "relu_bias": dict(activation="relu", expert_bias=True),
    "geglu_bias": dict(activation="geglu", expert_bias=True),  # a gated one besides swiglu
}

# The router's gradients sum many token terms of both signs through the softmax backward
# (differences of per-expert terms): in bf16 their error reaches ~8% of their largest value, as
# much as a plain bf16 einsum SMEAR's (measured over 60 seeds: 7-10%).
ROUTER_GRAD_TOL = {torch.float32: None, torch.bfloat16: 1.5e-1}


def make(name="swiglu", device="cpu", dtype=torch.float32, **kw):
    """A layer with O(1) activations and non-uniform routing (router gain 1 instead of 1e-2) and
    randomized norms and biases, so every parameter's gradient is visible in the checks."""
    kw = {"expert_dropout": 0.0, "router_init_scale": 1.0, "initializer_range": 0.2,
          **CONFIGS[name], **kw}
    layer = moeyard.SmearMoE(D, I, E, **kw)
    with torch.no_grad():
        r = layer.router
        for p in (r.norm.weight, r.weight_norm.weight):
            p.add_(0.2 * torch.randn_like(p))
        r.norm.bias.normal_(std=0.2)
        ex = layer.experts
        if ex.gate_up_proj_bias is not None:
            ex.gate_up_proj_bias.normal_(std=0.1), ex.down_proj_bias.normal_(std=0.1)
    return layer.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------- naive reference


def act(h, name):
    """The activation in torch's functions: f(h), or f(gate) * up over the halves [gate | up]."""
    a = ref.ACTIVATIONS[name]
    f = {"silu": F.silu, "gelu": F.gelu, "relu": torch.relu}[a.fn]
    if a.gate == "halves":
        g, u = h.chunk(2, dim=-1)
        return f(g) * u
    return f(h)


def naive_probs(layer, x, mask=None, keep=None):
    """SMEAR's router written out (ALGORITHMS.md 3.2), fp32: mean over the sequence (or over the
    masked positions), LayerNorm, LayerNorm'd router weights, softmax, dropout mask ``keep``."""
    r = layer.router
    xf = x.float()
    if mask is None:
        v = xf.mean(1)
    else:
        m = mask.float()
        v = (xf * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    v = F.layer_norm(v, (D,), r.norm.weight.float(), r.norm.bias.float(), r.norm.eps)
    w_hat = torch.stack([F.layer_norm(r.weight[e].float(), (D,), r.weight_norm.weight.float(),
                                      None, r.weight_norm.eps)
                         for e in range(E)])
    probs = torch.softmax(v @ w_hat.t(), -1)
    if keep is not None:
        probs = (probs * keep + 1e-10) / (probs * keep + 1e-10).sum(-1, keepdim=True)
    return probs


def naive_smear(layer, x, mask=None, keep=None):
    """(out, aux_losses, stats): per example, its merged MLP from explicit merged weights."""
    probs = naive_probs(layer, x, mask, keep)
    ex = layer.experts
    params = [ex.gate_up_proj, ex.gate_up_proj_bias, ex.down_proj, ex.down_proj_bias]
    outs = []
    for b in range(x.shape[0]):
        w1, b1, w2, b2 = (None if t is None else
                          (probs[b].view(-1, *[1] * (t.dim() - 1)) * t.float()).sum(0)
                          for t in params)
        h = act(F.linear(x[b].float(), w1, b1), ex.activation)
        outs.append(F.linear(h, w2, b2))
    out = torch.stack(outs) if outs else x.new_zeros(x.shape, dtype=torch.float32)
    stats = {"probs_mean": probs.mean(0),
             "entropy": -(probs * probs.log()).sum(-1).mean()}
    return out.to(x.dtype), {}, stats


# ------------------------------------------------------------------------------ forward/backward


# relu is compared in fp32 only: in bf16 the roundings of the merged weights flip pre-activations
# near relu's kink, so the two sides legitimately differ there.
NAME_DTYPE = [pytest.param(n, dt, id=f"{n}-{i}") for n in CONFIGS
              for dt, i in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
              if not (dt == torch.bfloat16 and n.startswith("relu"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,dtype", NAME_DTYPE)
def test_layer_matches_naive(name, dtype, training, device):
    layer = make(name, device, dtype).train(training)
    x = torch.randn(B, S, D, device=device).to(dtype)
    g = torch.randn(B, S, D, device=device)
    check_layer_against(layer, lambda v: naive_smear(layer, v), x, g, ROUTER_GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["swiglu", "silu_bias"])
def test_expert_dropout_matches_naive_with_the_same_mask(name, device):
    """Training with expert dropout: the layer's forward draws one torch.rand(B, E), first; the
    naive layer gets the mask of the same draw (same seed). Forward, gradients and stats agree.
    Router gradients are compared at 3e-3 of their largest value: an example left with one
    expert (probability ~1 - 3e-10) passes almost no gradient to the router, so the router's
    gradient is small next to the terms it sums."""
    layer = make(name, device, expert_dropout=0.4).train()
    x = torch.randn(B, S, D, device=device)
    g = torch.randn(B, S, D, device=device)
    torch.manual_seed(123)
    keep = torch.rand(B, E, device=device) >= 0.4
    assert not keep.all() and keep.any()  # the mask drops some experts and keeps some
    torch.manual_seed(123)
    check_layer_against(layer, lambda v: naive_smear(layer, v, keep=keep), x, g,
                        router_grad_tol=3e-3)


def test_expert_dropout_renormalizes_and_eval_does_not_drop():
    layer = make(expert_dropout=0.5)
    x = torch.randn(64, S, D)
    router = layer.router.train()
    probs = router(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    dropped = probs < 1e-8
    assert 0.3 < dropped.float().mean() < 0.7  # about half of the (example, expert) pairs
    all_dropped = dropped.all(-1)  # every expert dropped: (0 + 1e-10) / (E * 1e-10), uniform
    torch.testing.assert_close(probs[all_dropped], torch.full_like(probs[all_dropped], 1 / E))
    router.eval()
    torch.testing.assert_close(router(x), naive_probs(layer, x))


def test_init_routes_near_uniform():
    """Router weight normalization with gain 1e-2 (the default): tiny logits, near-uniform probs."""
    layer = moeyard.SmearMoE(64, 32, 8).eval()
    layer(torch.randn(16, 12, 64))
    assert layer.last_stats["entropy"].item() > 0.99 * math.log(8)
    probs = layer.router(torch.randn(16, 12, 64))
    assert probs.max() < 1.5 / 8 and probs.min() > 0.5 / 8


# ------------------------------------------------------------------------------ masked mean


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mean_excludes_padding(device):
    """With an attention mask, padding (here huge random values) changes neither the routing nor the
    outputs at real tokens: each example equals the layer run on its unpadded tokens alone.
    Without the mask the padding counts, as in the reference."""
    layer = make("silu_bias", device).eval()
    lengths = [10, 4, 7]
    x = torch.randn(B, S, D, device=device)
    mask = torch.zeros(B, S, dtype=torch.long, device=device)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        x[b, n:] = 100 * torch.randn(S - n, D, device=device)
    out = layer(x, attention_mask=mask)
    probs_masked = layer.last_stats["probs_mean"]
    for b, n in enumerate(lengths):
        alone = layer(x[b:b + 1, :n])
        close(out[b:b + 1, :n], alone, 1e-5)
    torch.testing.assert_close(out, naive_smear(layer, x, mask=mask)[0], rtol=1e-5, atol=1e-5)
    layer(x)  # unmasked: the padding enters the mean, the routing changes
    assert not torch.allclose(layer.last_stats["probs_mean"], probs_masked, atol=1e-3)
    # a bool mask means the same; an all-padding example gets v = 0 (no NaN)
    torch.testing.assert_close(layer(x, attention_mask=mask.bool()), out)
    mask[1] = 0
    assert torch.isfinite(layer(x, attention_mask=mask)).all()


def test_2d_input_is_one_example():
    layer = make("gelu").eval()
    x = torch.randn(S, D)
    out = layer(x)
    assert out.shape == (S, D)
    torch.testing.assert_close(out, layer(x[None])[0])
    mask = torch.arange(S) < 6
    torch.testing.assert_close(layer(x, attention_mask=mask),
                               layer(x[None], attention_mask=mask[None])[0])
    close(layer(x, attention_mask=mask)[:6], layer(x[:6]), 1e-5)


# ----------------------------------------------------------------------------------- training


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    layer = moeyard.SmearMoE(D, I, E, initializer_range=0.2)  # default dropout 0.1, train mode
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(8, S, D)
    target = torch.tanh(x @ torch.randn(D, D) / D**0.5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert layer.router.weight.grad.abs().sum() > 0  # the router learns too


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    layer = make(name)
    sd = layer.state_dict()
    n1 = 2 * I if ref.is_gated(layer.experts.activation) else I
    assert sd["router.weight"].shape == (E, D)
    assert {"router.norm.weight", "router.norm.bias", "router.weight_norm.weight"} <= sd.keys()
    assert sd["experts.gate_up_proj"].shape == (E, n1, D)
    assert sd["experts.down_proj"].shape == (E, D, I)
    assert ("experts.down_proj_bias" in sd) == name.endswith("bias")
    other = moeyard.SmearMoE(D, I, E, expert_dropout=0.0, **CONFIGS[name])
    other.load_state_dict(sd)
    x = torch.randn(B, S, D)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_bf16_layer_keeps_fp32_routing():
    layer = make(dtype=torch.bfloat16)
    x = torch.randn(B, S, D, dtype=torch.bfloat16)
    assert layer.router(x).dtype == torch.float32
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.last_stats["probs_mean"].dtype == torch.float32


# ---------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(training, device):
    torch._dynamo.reset()
    layer = make("swiglu", device).train(training)
    x = torch.randn(B, S, D, device=device)
    mask = (torch.arange(S, device=device) < torch.tensor([[10], [3], [6]], device=device))
    g = torch.randn(B, S, D, device=device)

    def run(fn):
        return lambda v: (fn(v, attention_mask=mask), layer.aux_losses)

    eager = fwd_bwd(run(layer), layer, x, g), dict(layer.last_stats)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = fwd_bwd(run(compiled), layer, x, g), dict(layer.last_stats)
    (out, losses, grads), stats = got
    (e_out, e_losses, e_grads), e_stats = eager
    torch.testing.assert_close(out, e_out)
    assert losses == e_losses == {}
    for a, b in zip(grads, e_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(stats, e_stats)


# ------------------------------------------------------------------------ bad configurations


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="tanh"), "activation"),
    (dict(activation="swish"), "activation must be one of 'none', 'silu', "),
    (dict(expert_dropout=1.0), "expert_dropout=1.0"),
    (dict(expert_dropout=-0.1), "expert_dropout=-0.1"),
    (dict(router_init_scale=0.0), "router_init_scale"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeyard.SmearMoE(D, I, E, **kwargs)


@pytest.mark.parametrize("sizes, match", [((D, I, 0), "num_experts"), ((0, I, E), "hidden_size"),
                                          ((D, 0, E), "intermediate_size")])
def test_bad_sizes_raise(sizes, match):
    with pytest.raises(ValueError, match=match):
        moeyard.SmearMoE(*sizes)


@pytest.mark.parametrize("x, mask, match", [
    (torch.randn(B, S, D + 1), None, "hidden_size=16"),
    (torch.randn(2, B, S, D), None, r"\[B, S, hidden_size=16\]"),
    (torch.randn(B, S, D), torch.ones(B, S + 1), r"attention_mask must have shape \(3, 10\)"),
    (torch.randn(S, D), torch.ones(1, S), r"attention_mask must have shape \(10,\)"),
])
def test_bad_input_raises(x, mask, match):
    with pytest.raises(ValueError, match=match):
        make()(x, attention_mask=mask)


@pytest.mark.parametrize("shape", [(0, S, D), (B, 0, D)], ids=["B0", "S0"])
def test_empty_input(shape):
    layer = make("silu_bias")
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(torch.isfinite(v).all() for v in layer.last_stats.values())
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
