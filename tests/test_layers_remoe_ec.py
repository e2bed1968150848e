"""ReMoE and ExpertChoiceMoE against naive pure-PyTorch layers on the same weights (forward,
backward, L1 loss, stats), train vs eval, the ReMoE coefficient controller (update rule and a toy
run reaching the target sparsity), state_dict, torch.compile and bad configurations."""
import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, check_layer_against, close, expert_out, fwd_bwd, run_layer

D, I, E, B, S = 16, 8, 8, 2, 12  # tokens T = B * S = 24

CONFIGS = {
    "remoe": lambda **kw: moeyard.ReMoE(D, I, E, k=2, **kw),
    "remoe_kmax": lambda **kw: moeyard.ReMoE(D, I, E, k=1, k_max=3, activation="gelu",
                                             expert_bias=True, **kw),
    "remoe_capacity": lambda **kw: moeyard.ReMoE(D, I, E, k=2, capacity_factor=0.5,
                                                 eval_capacity_factor=1.0, min_capacity=1, **kw),
    "ec": lambda **kw: moeyard.ExpertChoiceMoE(D, I, E, **kw),
    "ec_cf1": lambda **kw: moeyard.ExpertChoiceMoE(D, I, E, capacity_factor=1.0,
                                                   activation="relu", expert_bias=True, **kw),
}


def make(name, device="cpu", dtype=torch.float32, **kw):
    layer = CONFIGS[name](initializer_range=0.2, **kw).to(device=device, dtype=dtype)
    if isinstance(layer, moeyard.ReMoE):
        layer.l1_reg_coeff.fill_(0.3)  # large enough that the L1 gradient shows in the checks
    ex = layer.experts
    if ex.gate_up_proj_bias is not None:
        with torch.no_grad():
            ex.gate_up_proj_bias.normal_(std=0.1), ex.down_proj_bias.normal_(std=0.1)
    return layer


# ------------------------------------------------------------------------- naive reference


def naive_remoe(layer, x):
    """(out, aux_losses, stats): dense ReLU gates, top-k_max of them kept, one expert at a time."""
    h = x.reshape(-1, D)
    T = h.shape[0]
    logits = F.linear(h.float(), layer.router.weight.float())
    gates = F.relu(logits)
    k_max = layer.router.k_max
    if k_max < E:
        keep = torch.zeros_like(gates, dtype=torch.bool)
        keep.scatter_(1, gates.topk(k_max, dim=-1).indices, True)
        gates = gates * keep
    active = gates > 0
    kept = _capacity_drops(gates, active, layer.capacity(T))
    out = torch.zeros(T, D, device=h.device)
    for e in range(E):
        tok = torch.nonzero(kept[:, e]).flatten()
        out = out.index_add(0, tok, gates[tok, e, None] * expert_out(layer.experts, e, h[tok]))
    counts = active.sum(0)
    losses = {}
    if layer.training:
        f = E * counts.float() / (layer.k * T)
        losses["l1"] = layer.l1_reg_coeff * (f * F.relu(logits).mean(0)).sum()
    mean = counts.float().mean()
    dropped = 1 - kept.sum() / active.sum().clamp(min=1)
    stats = {"tokens_per_expert": counts, "max_violation": (counts.max() - mean) / mean,
             "dropped_fraction": dropped, "sparsity": 1 - active.float().mean()}
    return out.to(x.dtype).view(x.shape), losses, stats


def _capacity_drops(gates, active, capacity):
    """The active (token, expert) pairs an expert capacity keeps, by position: each token's
    largest gate (slot 0) of every token before any second-largest, earlier tokens first."""
    if capacity is None:
        return active
    kept = torch.zeros_like(active)
    load = [0] * active.shape[1]
    order = gates.argsort(dim=1, descending=True, stable=True)
    for j in range(active.shape[1]):
        for t in range(active.shape[0]):
            e = int(order[t, j])
            if active[t, e] and load[e] < capacity:
                kept[t, e], load[e] = True, load[e] + 1
    return kept


def naive_ec(layer, x):
    """(out, aux_losses, stats): every expert takes its top-C tokens by softmax score."""
    h = x.reshape(-1, D)
    T = h.shape[0]
    C = min(T, max(1, round(layer.capacity_factor * T / E)))
    scores = torch.softmax(F.linear(h.float(), layer.router.weight.float()), -1)
    out = torch.zeros(T, D, device=h.device)
    taken = torch.zeros(T, dtype=torch.bool, device=h.device)
    for e in range(E):
        tok = scores[:, e].topk(C).indices
        taken[tok] = True
        out = out.index_add(0, tok, scores[tok, e, None] * expert_out(layer.experts, e, h[tok]))
    stats = {"tokens_per_expert": torch.full((E,), C), "max_violation": torch.zeros(()),
             "dropped_fraction": torch.zeros(()), "unrouted_fraction": 1 - taken.float().mean()}
    return out.to(x.dtype).view(x.shape), {}, stats


def naive_layer(layer, x):
    return (naive_remoe if isinstance(layer, moeyard.ReMoE) else naive_ec)(layer, x)


# ------------------------------------------------------------------------------ forward/backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_naive(name, training, dtype, device):
    layer = make(name, device, dtype).train(training)
    x = torch.randn(B, S, D, device=device).to(dtype)
    g = torch.randn(B, S, D, device=device)
    check_layer_against(layer, lambda v: naive_layer(layer, v), x, g)


def test_remoe_tokens_get_variable_experts_and_some_none():
    layer = make("remoe")
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.linspace(-1, 1, E)  # x[:, 0] sets how many are active
    x = torch.zeros(3, D)
    x[:, 0] = torch.tensor([-5.0, 0.0, 5.0])
    out = layer(x)
    assert (out[1] == 0).all()  # all gates 0: the token gets nothing from the layer
    _, weights, experts = layer.router(x)
    assert ((experts >= 0).sum(1) == torch.tensor([4, 0, 4])).all()


def test_remoe_l1_oracle_uniform_gates():
    """Gates g on exactly k experts per token: L1 = lambda * k * g (ALGORITHMS.md 4.8)."""
    layer = moeyard.ReMoE(D, I, E, k=2)
    layer.l1_reg_coeff.fill_(0.5)
    T, g = 8 * 4, 0.7
    logits = torch.full((T, E), -1.0)
    for t in range(T):  # balanced: expert pairs (2i, 2i+1) in turn
        logits[t, 2 * (t % 4): 2 * (t % 4) + 2] = g
    counts = (logits > 0).sum(0).int()
    assert layer.l1_loss(logits, counts).item() == pytest.approx(2 * g)


def test_expert_choice_capacity_and_balance():
    layer = make("ec")
    assert layer.capacity(24) == 6 and layer.capacity(3) == 1 and layer.capacity(0) == 0
    assert make("ec", capacity_factor=16.0).capacity(24) == 24  # at most T
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0  # every token prefers expert 0
    x = torch.randn(B, S, D)
    x[..., 0] = x[..., 0].abs() + 1
    layer(x)
    assert (layer.last_stats["tokens_per_expert"] == 6).all()  # balanced by construction


# --------------------------------------------------------------------------- train vs eval


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_vs_eval(name):
    layer = make(name)
    x = torch.randn(B, S, D)
    out_train = layer(x)
    assert ("l1" in layer.aux_losses) == name.startswith("remoe")
    out_eval = layer.eval()(x)
    if not isinstance(layer, moeyard.ReMoE) or layer.capacity_factor == layer.eval_capacity_factor:
        torch.testing.assert_close(out_eval, out_train, rtol=0, atol=0)  # same routing either way
    else:  # a larger eval capacity drops less
        assert not torch.equal(out_eval, out_train)
    assert layer.aux_losses == {}
    if name.startswith("remoe"):
        assert layer.forwards_since_update.item() == 1  # eval forwards do not count
        layer.train()
        with torch.no_grad():
            layer(x)  # nor do no-grad (activation recompute) forwards
        assert layer.forwards_since_update.item() == 1 and layer.aux_losses == {}
        close(layer.sparsity_since_update, layer.last_stats["sparsity"], 1e-6)


# ------------------------------------------------------------------------------ controller


def test_controller_update_rule():
    model = torch.nn.ModuleList([make("remoe"), make("remoe")])
    for m in model:
        m.l1_reg_coeff.fill_(1e-8)
    ctl = moeyard.ReMoEController(model)
    x = torch.randn(B, S, D)
    n = 3
    for _ in range(n):  # init-time sparsity ~0.5 is below the target 0.75: lambda grows
        model[0](x), model[1](x[:1])
        assert model[0].last_stats["sparsity"].item() < 0.75
        ctl.step()
        assert model[0].forwards_since_update.item() == 0
    for m in model:
        assert m.l1_reg_coeff.item() == pytest.approx(1e-8 * 1.2 ** n, rel=1e-5)
    ctl.step()  # no forward since the last step: unchanged
    assert model[0].l1_reg_coeff.item() == pytest.approx(1e-8 * 1.2 ** n, rel=1e-5)
    with torch.no_grad():
        for m in model:
            m.router.weight.fill_(-1.0)
    model[0](x.abs())  # all gates 0: sparsity 1 above target: lambda shrinks
    assert model[0].last_stats["sparsity"].item() == 1.0
    ctl.step()
    for m in model:  # one shared sparsity drives every layer
        assert m.l1_reg_coeff.item() == pytest.approx(1e-8 * 1.2 ** (n - 1), rel=1e-5)


def test_controller_per_layer_and_mean_over_forwards():
    a, b = make("remoe"), make("remoe_kmax")  # targets 0.75 and 0.875
    model = torch.nn.ModuleList([a, b])
    with pytest.raises(ValueError, match="per_layer"):
        moeyard.ReMoEController(model)
    ctl = moeyard.ReMoEController(model, alpha=2.0, per_layer=True)
    a.sparsity_since_update.fill_(0.8 + 0.6)  # two forwards, mean 0.7 < 0.75: up
    a.forwards_since_update.fill_(2)
    b.sparsity_since_update.fill_(0.875)  # S == target divides
    b.forwards_since_update.fill_(1)
    ctl.step()
    assert a.l1_reg_coeff.item() == pytest.approx(0.6)
    assert b.l1_reg_coeff.item() == pytest.approx(0.15)


def test_controller_toy_run_reaches_target_sparsity():
    """Dense at init (sparsity ~0.5 < 0.75): lambda grows until the L1 term sparsifies the gates,
    then oscillates by factors of alpha with the sparsity near 1 - k/E (ReMoE's stage III)."""
    torch.manual_seed(0)
    layer = moeyard.ReMoE(D, I, E, k=2, l1_coef_init=1e-2, initializer_range=0.2)
    ctl = moeyard.ReMoEController(layer)
    opt = torch.optim.Adam(layer.parameters(), lr=2e-2)
    x = torch.randn(32, D)
    target = torch.tanh(x @ torch.randn(D, D) / D**0.5)
    lambdas, sparsity = [], []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target) + moeyard.collect_aux_losses(layer)
        loss.backward()
        opt.step()
        ctl.step()
        lambdas.append(layer.l1_reg_coeff.item())
        sparsity.append(layer.last_stats["sparsity"].item())
    assert sparsity[0] < 0.7 and lambdas[30] > 100 * lambdas[0]
    steps = [b / a for a, b in zip(lambdas[-20:], lambdas[-19:])]
    assert any(r > 1 for r in steps) and any(r < 1 for r in steps)  # oscillating
    tail = sum(sparsity[-20:]) / 20
    assert abs(tail - 0.75) < 0.05, (tail, sparsity[-20:])


def test_controller_needs_remoe_and_alpha():
    with pytest.raises(ValueError, match="no ReMoE"):
        moeyard.ReMoEController(make("ec"))
    with pytest.raises(ValueError, match="alpha"):
        moeyard.ReMoEController(make("remoe"), alpha=0.5)


# ------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    layer = make(name)
    if name.startswith("remoe"):
        layer.l1_reg_coeff.fill_(3.25e-3)
    sd = layer.state_dict()
    assert ("l1_reg_coeff" in sd) == name.startswith("remoe")
    assert "sparsity_since_update" not in sd and "forwards_since_update" not in sd
    assert sd["router.weight"].shape == (E, D) and sd["experts.gate_up_proj"].shape[0] == E
    other = make(name)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(B, S, D)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(other.aux_losses, layer.aux_losses, rtol=0, atol=0)


def test_lambda_stays_fp32():
    layer = make("remoe").to(torch.bfloat16)
    assert layer.l1_reg_coeff.dtype == torch.float32
    assert layer.sparsity_since_update.dtype == torch.float32
    assert layer.experts.down_proj.dtype == torch.bfloat16
    assert layer(torch.randn(3, D, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.aux_losses["l1"].dtype == torch.float32


# ---------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["remoe", "remoe_kmax", "ec"])
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
    if name.startswith("remoe"):  # both runs accumulated their sparsity
        assert layer.forwards_since_update.item() == 2
        close(layer.sparsity_since_update, 2 * stats["sparsity"], 1e-6)


# ------------------------------------------------------------------------ bad configurations


@pytest.mark.parametrize("cls, kwargs, match", [
    ("ReMoE", dict(k=0), "k=0"),
    ("ReMoE", dict(k=9), "k=9"),
    ("ReMoE", dict(k_max=0), "k_max=0"),
    ("ReMoE", dict(k_max=9), "k_max=9"),
    ("ReMoE", dict(l1_coef_init=0.0), "l1_coef_init"),
    ("ReMoE", dict(jitter_eps=1.5), "jitter_eps"),
    ("ReMoE", dict(activation="tanh"), "activation"),
    ("ExpertChoiceMoE", dict(capacity_factor=0.0), "capacity_factor=0.0"),
    ("ExpertChoiceMoE", dict(capacity_factor=-2.0), "capacity_factor=-2.0"),
    ("ExpertChoiceMoE", dict(activation="tanh"), "activation"),
])
def test_bad_configuration_raises(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(moeyard, cls)(D, I, E, **kwargs)


@pytest.mark.parametrize("name", ["remoe", "ec"])
def test_hidden_size_mismatch_raises(name):
    with pytest.raises(ValueError, match="hidden_size=16"):
        make(name)(torch.randn(B, S, D + 1))


@pytest.mark.parametrize("name", ["remoe", "ec"])
def test_empty_batch(name):
    layer = make(name)
    x = torch.randn(0, S, D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    (out.sum() + moeyard.collect_aux_losses(layer)).backward()
    assert layer.last_stats["tokens_per_expert"].sum() == 0
    assert all(torch.isfinite(v).all() for v in layer.last_stats.values())
