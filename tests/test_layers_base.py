"""BaseMoE (BASE layers) against a naive pure-PyTorch layer on the same weights (forward, backward,
stats), train (balanced assignment) vs eval (greedy), zero-init identity, training, state_dict,
torch.compile and bad configurations."""
import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, check_layer_against, fwd_bwd, run_layer

D, I, E, B, S = 16, 8, 4, 2, 12  # tokens T = B * S = 24

CONFIGS = {
    "relu": lambda **kw: moeyard.BaseMoE(D, I, E, **kw),
    "swiglu_nobias": lambda **kw: moeyard.BaseMoE(D, I, E, activation="swiglu", expert_bias=False,
                                                  **kw),
    "gelu_residual": lambda **kw: moeyard.BaseMoE(D, I, 5, activation="gelu", residual=True,
                                                  **kw),  # 24 tokens, 5 experts: 5,5,5,5,4
}


def make(name, device="cpu", dtype=torch.float32, trained=True, **kw):
    """A layer; ``trained`` replaces the zero down_proj (and the unit LayerNorms, the zero biases)
    by random values so that every parameter shows in the output and its gradients."""
    layer = CONFIGS[name](initializer_range=0.2, **kw)
    if trained:
        with torch.no_grad():
            for p in layer.parameters():
                if p is not layer.expert_centroids:
                    p.normal_(std=0.3).add_(1.0 if p is layer.norm_weight else 0.0)
            layer.expert_centroids.mul_(10)  # gates away from 1/2
    return layer.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------- naive reference


def naive_base(layer, x):
    """(out, aux_losses, stats): route with reference.balanced_assignment (training) or argmax
    (eval), then one expert at a time: alpha * ff2(act(ff1(LN_e(x)))) (+ x with residual)."""
    h = x.reshape(-1, D)
    n_exp = layer.num_experts
    logits = F.linear(h.float(), layer.expert_centroids.float())
    if layer.training:
        experts = ref.balanced_assignment(logits.detach().cpu())[:, 0].long().to(h.device)
    else:
        experts = logits.argmax(-1)
    ex = layer.experts
    out = torch.zeros(h.shape[0], D, device=h.device)
    for e in range(n_exp):
        tok = torch.nonzero(experts == e).flatten()
        v = h[tok].float()
        z = F.layer_norm(v, (D,), layer.norm_weight[e].float(), layer.norm_bias[e].float(), 1e-5)
        b1 = None if ex.gate_up_proj_bias is None else ex.gate_up_proj_bias[e].float()
        b2 = None if ex.down_proj_bias is None else ex.down_proj_bias[e].float()
        y = F.linear(ref.activation(F.linear(z, ex.gate_up_proj[e].float(), b1), ex.activation),
                     ex.down_proj[e].float(), b2)
        alpha = torch.sigmoid(v @ layer.expert_centroids[e].float())
        out = out.index_add(0, tok, alpha[:, None] * y)
    if layer.residual:
        out = h.float() + out
    counts = torch.bincount(experts, minlength=n_exp)
    mean = counts.float().mean()
    stats = {"tokens_per_expert": counts, "max_violation": (counts.max() - mean) / mean,
             "dropped_fraction": torch.zeros(())}
    return out.to(x.dtype).view(x.shape), {}, stats


# ------------------------------------------------------------------------------ forward/backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_naive(name, training, dtype, device):
    layer = make(name, device, dtype).train(training)
    x = torch.randn(B, S, D, device=device).to(dtype)
    g = torch.randn(B, S, D, device=device)
    check_layer_against(layer, lambda v: naive_base(layer, v), x, g)


def test_centroids_learn_only_through_the_gate():
    layer = make("relu")
    x = torch.randn(B * S, D)
    out, _, grads = fwd_bwd(run_layer(layer), layer, x, torch.randn(B * S, D))
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    g = dict(zip(names, grads))
    assert g["expert_centroids"].abs().sum() > 0  # through alpha = sigmoid(x . c_e)
    # with a constant gate the centroid gets no gradient: the assignment is not differentiable
    with torch.no_grad():
        layer.expert_centroids.mul_(1e6)  # sigmoid saturates at 0 or 1: zero derivative
    _, _, grads = fwd_bwd(run_layer(layer), layer, x, torch.randn(B * S, D))
    assert dict(zip(names, grads))["expert_centroids"].abs().max() < 1e-6


# --------------------------------------------------------------------------- train vs eval


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [24, 23, 3])  # divisible, not divisible, fewer tokens than experts
def test_training_is_exactly_balanced_and_optimal(device, T):
    layer = make("relu", device)
    with torch.no_grad():
        layer.expert_centroids[0] += 3.0  # skewed affinities: greedy would favour expert 0
    x = torch.randn(T, D, device=device) + 1.0
    layer(x)
    want = ref.assignment_capacities(T, E)
    assert torch.equal(layer.last_stats["tokens_per_expert"].cpu(), want.int())
    if T % E == 0:
        assert layer.last_stats["max_violation"].item() == 0
    scores = F.linear(x.float(), layer.expert_centroids.float()).detach()
    assert torch.equal(moeyard.balanced_assignment(scores).cpu(),
                       ref.balanced_assignment(scores.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_eval_is_greedy_argmax(device):
    layer = make("relu", device).eval()
    with torch.no_grad():
        layer.expert_centroids[0] += 3.0
    x = torch.randn(40, D, device=device) + 1.0
    layer(x)
    greedy = F.linear(x, layer.expert_centroids).argmax(-1)
    assert torch.equal(layer.last_stats["tokens_per_expert"].cpu(),
                       torch.bincount(greedy.cpu(), minlength=E).int())
    assert layer.last_stats["tokens_per_expert"][0] > 10  # not balanced: 40 / 4 = 10 each
    # the mode follows module.training, not requires_grad (fairseq's pitfall)
    with torch.no_grad():
        layer.train()(x)
    assert (layer.last_stats["tokens_per_expert"] == 10).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_init_is_identity(name, device):
    layer = make(name, device, trained=False)
    assert (layer.experts.down_proj == 0).all()
    c = layer.expert_centroids.detach()
    torch.testing.assert_close(c @ c.T, 0.01 * torch.eye(c.shape[0], device=device))  # gain 0.1
    x = torch.randn(B, S, D, device=device)
    for training in (True, False):
        out = layer.train(training)(x)
        want = x if layer.residual else torch.zeros_like(x)
        assert torch.equal(out, want)


def test_flat_tokens_and_residual_flag():
    layer = make("relu").eval()
    x = torch.randn(B, S, D)
    torch.testing.assert_close(layer(x.view(-1, D)), layer(x).view(-1, D))
    res = make("relu", residual=True).eval()
    res.load_state_dict(layer.state_dict())
    torch.testing.assert_close(res(x), x + layer(x))


# --------------------------------------------------------------------------------- training


def test_adam_steps_lower_the_loss():
    layer = make("relu", trained=False)
    x = torch.randn(64, D)
    target = torch.tanh(x @ torch.randn(D, D) / D**0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)

    def loss_fn():
        return F.mse_loss(layer(x), target)

    first = loss_fn().item()
    centroids = layer.expert_centroids.detach().clone()
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first
    assert not torch.equal(layer.expert_centroids, centroids)  # the router learned


# ------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    layer = make(name)
    sd = layer.state_dict()
    assert sd["expert_centroids"].shape == (layer.num_experts, D)
    assert sd["norm_weight"].shape == sd["norm_bias"].shape == (layer.num_experts, D)
    assert sd["experts.gate_up_proj"].shape[0] == layer.num_experts
    other = make(name, trained=False)
    other.load_state_dict(sd)
    x = torch.randn(B, S, D)
    for training in (True, False):
        layer.train(training), other.train(training)
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_bf16_layer():
    layer = make("relu").to(torch.bfloat16)
    out = layer(torch.randn(3, 5, D, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, D)
    assert layer.expert_centroids.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(training, device):
    torch._dynamo.reset()
    layer = make("gelu_residual", device).train(training)
    x = torch.randn(B, S, D, device=device)
    g = torch.randn(B, S, D, device=device)
    out, _, grads = fwd_bwd(run_layer(layer), layer, x, g)
    stats = layer.last_stats
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    c_out, _, c_grads = fwd_bwd(run_layer(compiled), layer, x, g)
    torch.testing.assert_close(c_out, out)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.last_stats, stats)


# ------------------------------------------------------------------------ bad configurations


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=0), "num_experts=0"),
    (dict(hidden_size=0), "hidden_size=0"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(activation="tanh"), "activation"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_configuration_raises(kwargs, match):
    args = {**dict(hidden_size=D, intermediate_size=I, num_experts=E), **kwargs}
    with pytest.raises(ValueError, match=match):
        moeyard.BaseMoE(**args)


def test_hidden_size_mismatch_raises():
    layer = make("relu")
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(B, S, D + 1))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    layer = make("relu").train(training)
    x = torch.randn(0, S, D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert layer.last_stats["tokens_per_expert"].sum() == 0
    assert layer.aux_losses == {}
