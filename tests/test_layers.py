"""SwitchMoE and TopKMoE (PhiMoE's sparsemixer routing included) against a naive pure-PyTorch
layer on the same weights (forward, backward, aux losses, stats), train vs eval behaviour, training,
bias balancing, collect_aux_losses, state_dict, torch.compile and bad configurations."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, check_layer_against, close, fwd_bwd, run_layer

D, I, E, B, S = 16, 8, 8, 2, 12  # tokens T = B * S = 24

# Name -> layer constructor (initializer_range 0.2 keeps activations O(1)). Together they cover
# capacity drops, dropless, expert biases, every preset, shared experts (gated and not), z-loss,
# sigmoid scores with a selection bias, group-limited routing and sparsemixer (a window of 0.2, wide
# enough that most tokens have several candidates and the router a gradient).
CONFIGS = {
    "switch": lambda **kw: moeyard.SwitchMoE(D, I, E, **kw),
    "switch_dropless": lambda **kw: moeyard.SwitchMoE(D, I, E, capacity_factor=None,
                                                      activation="gelu", expert_bias=True, **kw),
    "mixtral": lambda **kw: moeyard.TopKMoE.mixtral(D, I, num_experts=E, **kw),
    "qwen3_capacity": lambda **kw: moeyard.TopKMoE.qwen3_moe(
        D, I, num_experts=E, k=3, capacity_factor=1.0, eval_capacity_factor=0.5, z_loss_coef=1e-3,
        **kw),
    "qwen2_shared": lambda **kw: moeyard.TopKMoE.qwen2_moe(D, I, 12, num_experts=E, k=2, **kw),
    "deepseek": lambda **kw: moeyard.TopKMoE.deepseek_v3(D, I, num_experts=E, k=2, n_group=4,
                                                         topk_group=2, **kw),
    "phimoe": lambda **kw: moeyard.TopKMoE.phimoe(D, I, num_experts=E, sparsemixer_eps=0.2, **kw),
}


def make(name, device="cpu", dtype=torch.float32, **kw):
    layer = CONFIGS[name](initializer_range=0.2, **kw).to(device=device, dtype=dtype)
    bias = layer.router.e_score_correction_bias
    if bias is not None:  # a trained-looking selection bias, so it changes the routing
        bias.copy_(0.05 * torch.randn(E))
    return layer


# ------------------------------------------------------------------------- naive reference


def naive_route(layer, h, noise=None, sm_noise=None):
    """(logits, weights [T,k], experts [T,k] int64) written out with torch ops (sparsemixer:
    reference.sparsemixer, on its training draws ``sm_noise``)."""
    r = layer.router
    xr = h.float() if noise is None else h.float() * noise
    logits = F.linear(xr, r.weight.float())
    if r.score == "sparsemixer":
        w, experts = ref.sparsemixer(logits, r.sparsemixer_eps, sm_noise)
        return logits, w, experts.long()
    s = torch.softmax(logits, -1) if r.score == "softmax" else torch.sigmoid(logits)
    sel = s if r.e_score_correction_bias is None else s + r.e_score_correction_bias
    if r.n_group > 1:
        T = h.shape[0]
        group = sel.view(T, r.n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group, dtype=torch.bool)
        keep.scatter_(1, group.topk(r.topk_group, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // r.n_group, dim=1), float("-inf"))
    experts = sel.topk(r.k, dim=-1).indices
    w = s.gather(1, experts)
    if r.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return logits, w * r.scale, experts


def naive_keep(experts, capacity):
    """Bool [T,k]: slot kept under position priority (first choices first, earlier tokens first)."""
    T, k = experts.shape
    keep = torch.ones(T, k, dtype=torch.bool)
    if capacity is None:
        return keep
    used = [0] * E
    for j in range(k):
        for t in range(T):
            e = int(experts[t, j])
            keep[t, j] = used[e] < capacity
            used[e] += 1
    return keep


def naive_layer(layer, x, noise=None, sm_noise=None):
    """(out, aux_losses, stats) of ``layer`` on x, one expert at a time, in fp32."""
    h = x.reshape(-1, D)
    T, k = h.shape[0], layer.k
    logits, w, experts = naive_route(layer, h, noise, sm_noise)
    cf = layer.capacity_factor if layer.training else layer.eval_capacity_factor
    capacity = None if cf is None else max(math.ceil(T * k / E * cf), layer.min_capacity)
    keep = naive_keep(experts.cpu(), capacity).to(h.device)
    ex = layer.experts
    out = torch.zeros(T, D, device=h.device)
    for e in range(E):
        tok, slot = torch.nonzero((experts == e) & keep, as_tuple=True)
        b1 = None if ex.gate_up_proj_bias is None else ex.gate_up_proj_bias[e].float()
        b2 = None if ex.down_proj_bias is None else ex.down_proj_bias[e].float()
        a = ref.activation(F.linear(h[tok].float(), ex.gate_up_proj[e].float(), b1),
                           ex.activation)
        y = F.linear(a, ex.down_proj[e].float(), b2)
        out = out.index_add(0, tok, w[tok, slot, None] * y)
    if layer.shared_expert is not None:
        m = layer.shared_expert
        hf = h.float()
        shared = F.linear(F.silu(F.linear(hf, m.gate_proj.weight.float()))
                          * F.linear(hf, m.up_proj.weight.float()), m.down_proj.weight.float())
        if layer.shared_expert_gate is not None:
            shared = torch.sigmoid(F.linear(hf, layer.shared_expert_gate.weight.float())) * shared
        out = out + shared
    counts = torch.bincount(experts.flatten(), minlength=E)
    f = counts.float() / (T * k)
    losses = {}
    sigmoid = layer.router.score == "sigmoid"
    if layer.aux_loss_coef > 0:
        P = normalized_scores(logits, sigmoid).mean(0)
        losses["balance"] = layer.aux_loss_coef * E * (f * P).sum()
    if layer.seq_aux_loss_coef > 0:
        sequences = h.shape[0] // x.shape[-2] if x.dim() == 3 else 1
        losses["seq_balance"] = layer.seq_aux_loss_coef * naive_seq_balance(logits, k, sequences,
                                                                            sigmoid)
    if layer.z_loss_coef > 0:
        losses["z"] = layer.z_loss_coef * (torch.logsumexp(logits, -1) ** 2).mean()
    stats = {"tokens_per_expert": counts,
             "max_violation": (counts.max() - counts.float().mean()) / counts.float().mean(),
             "dropped_fraction": 1 - keep.float().mean()}
    return out.to(x.dtype).view(x.shape), losses, stats


def normalized_scores(logits, sigmoid):
    """The balance losses' P summands: softmax, or the sigmoid normalized per token."""
    if not sigmoid:
        return torch.softmax(logits, -1)
    s = torch.sigmoid(logits)
    return s / s.sum(-1, keepdim=True)


def naive_seq_balance(logits, k, sequences, sigmoid):
    """DeepSeek-V3 eq. 17-20 without alpha: per sequence, f_e = E / (k S) * #tokens whose plain
    top-k of the scores has e, P_e = mean normalized score; the mean over the sequences."""
    T, n_exp = logits.shape
    S = T // sequences
    top = logits.topk(k, dim=-1).indices
    q = normalized_scores(logits, sigmoid)
    total = 0
    for b in range(sequences):
        rows = slice(b * S, (b + 1) * S)
        f = torch.bincount(top[rows].flatten(), minlength=n_exp).to(q.dtype) * n_exp / (k * S)
        total = total + (f * q[rows].mean(0)).sum()
    return total / sequences


# ------------------------------------------------------------------------------- helpers


def jitter_noise(layer, x, seed):
    """The router noise the layer draws after torch.manual_seed(seed) (training only)."""
    torch.manual_seed(seed)
    eps = layer.router.jitter_eps
    return torch.empty(x.numel() // D, D, device=x.device).uniform_(1 - eps, 1 + eps)


# ------------------------------------------------------------------------------ forward/backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_naive(name, training, dtype, device):
    layer = make(name, device, dtype).train(training)
    x = torch.randn(B, S, D, device=device).to(dtype)
    g = torch.randn(B, S, D, device=device)
    noise = sm_noise = None
    if training and layer.router.jitter_eps > 0:
        noise = jitter_noise(layer, x, 1234)
        torch.manual_seed(1234)
    if training and layer.router.score == "sparsemixer":  # the draws the layer will make
        torch.manual_seed(1234)
        sm_noise = moeyard.sparsemixer_noise(B * S, E, device)
        torch.manual_seed(1234)
    check_layer_against(layer, lambda v: naive_layer(layer, v, noise, sm_noise), x, g)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_tokens_and_shape(device):
    layer = make("mixtral", device)
    x = torch.randn(B, S, D, device=device)
    torch.testing.assert_close(layer(x.view(-1, D)), layer(x).view(-1, D))


# --------------------------------------------------------------------------- train vs eval


@pytest.mark.parametrize("device", DEVICES)
def test_switch_capacity_and_jitter_train_vs_eval(device):
    layer = make("switch", device)
    T = B * S
    assert layer.capacity(T) == max(math.ceil(T / E * 1.25), 4)
    layer.eval()
    assert layer.capacity(T) == max(math.ceil(T / E * 2.0), 4)
    x = torch.randn(B, S, D, device=device)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)  # eval: no jitter
    layer.train()
    lt1 = layer.router(x.view(-1, D))[0]
    lt2 = layer.router(x.view(-1, D))[0]
    assert not torch.equal(lt1, lt2)  # training: jittered router input
    le = layer.eval().router(x.view(-1, D))[0]
    bound = 1e-2 * F.linear(x.view(-1, D).abs(), layer.router.weight.abs()) + 1e-6
    assert ((lt1 - le).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_to_one_expert_keeps_first_capacity(device):
    """Every token prefers expert 0: exactly the first C tokens get an output, the rest 0."""
    layer = make("switch", device, capacity_factor=1.0, jitter_eps=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(1, S, D, device=device)
    x[..., 0] = x[..., 0].abs() + 1
    out = layer(x)[0]
    C = layer.capacity(S)
    assert (out[:C].abs().sum(-1) > 0).all() and (out[C:] == 0).all()
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(1 - C / S)
    assert layer.last_stats["tokens_per_expert"][0].item() == S  # pre-drop counts


# --------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adam_steps_lower_the_loss(name):
    layer = make(name)
    x = torch.randn(64, D)
    target = torch.tanh(x @ torch.randn(D, D) / D**0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)

    def loss_fn():
        return F.mse_loss(layer(x), target) + moeyard.collect_aux_losses(layer)

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first


def test_bias_balancer_drives_maxvio_down():
    layer = make("deepseek")
    layer.router.e_score_correction_bias.zero_()
    with torch.no_grad():
        layer.router.weight[3] += 0.5  # inputs have a positive mean: expert 3 takes most tokens
    x = torch.randn(256, D) + 1
    balancer = moeyard.BiasBalancer(layer, rate=1e-2)
    layer(x)
    before = layer.last_stats["max_violation"].item()
    assert before > 1.5
    for step in range(60):
        layer(x)
        balancer.step()
        assert (layer.router.load_since_update == 0).all()
        assert layer.router.e_score_correction_bias.abs().max() <= (step + 1) * 1e-2 + 1e-6
    with torch.no_grad():
        layer(x)  # no_grad forwards do not count toward the bias update
    assert (layer.router.load_since_update == 0).all()
    layer(x)
    assert layer.last_stats["max_violation"].item() < 0.3 * before


def test_bias_balancer_accumulates_between_steps_and_skips_eval():
    layer = make("deepseek")
    x = torch.randn(10, D)
    layer(x)
    c1 = layer.last_stats["tokens_per_expert"].clone()
    layer(x[:4])
    c2 = layer.last_stats["tokens_per_expert"]
    torch.testing.assert_close(layer.router.load_since_update, (c1 + c2).long())
    layer.eval()(x)
    torch.testing.assert_close(layer.router.load_since_update, (c1 + c2).long())
    bias = layer.router.e_score_correction_bias.clone()
    moeyard.BiasBalancer(layer, rate=1e-3).step()
    load = (c1 + c2).double()
    torch.testing.assert_close(layer.router.e_score_correction_bias,
                               bias + 1e-3 * torch.sign(load.mean() - load).float())


def test_bias_balancer_needs_a_bias_router():
    with pytest.raises(ValueError, match="bias_balancing"):
        moeyard.BiasBalancer(make("mixtral"))


def test_collect_aux_losses_sums_coefficients():
    coefs = [(0.5, 0.25), (2.0, 3.0)]
    model = torch.nn.ModuleList([make("switch", aux_loss_coef=a, z_loss_coef=z) for a, z in coefs]
                                + [make("deepseek")]).eval()
    x = torch.randn(B, S, D)
    want = torch.zeros(())
    for layer, (ca, cz) in zip(model, coefs):
        layer(x)
        unit = make("switch", aux_loss_coef=1.0, z_loss_coef=1.0).eval()
        unit.load_state_dict(layer.state_dict())
        _, raw, _ = naive_layer(unit, x)
        want = want + ca * raw["balance"] + cz * raw["z"]
    model[2](x)
    # DeepSeek balances by bias: no Switch loss, only the sequence-wise one (alpha 1e-4)
    assert set(model[2].aux_losses) == {"seq_balance"}
    want = want + naive_layer(model[2], x)[1]["seq_balance"]
    close(moeyard.collect_aux_losses(model), want, 1e-6)
    assert moeyard.collect_aux_losses(torch.nn.Linear(2, 2)).item() == 0.0


# ------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    layer = make(name)
    sd = layer.state_dict()
    assert ("router.e_score_correction_bias" in sd) == (name == "deepseek")
    assert "router.load_since_update" not in sd  # transient, not a checkpoint value
    assert sd["experts.gate_up_proj"].shape[0] == E and sd["router.weight"].shape == (E, D)
    other = make(name)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(B, S, D)
    layer.eval(), other.eval()
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_bias_stays_fp32_and_init_std():
    layer = moeyard.TopKMoE.deepseek_v3(64, 32, num_experts=16, k=2, n_group=4, topk_group=2)
    for p in (layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj,
              layer.shared_expert.gate_proj.weight):
        assert abs(p.std().item() - 0.02) < 0.004
    layer.to(torch.bfloat16)
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    assert layer.experts.down_proj.dtype == torch.bfloat16
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["switch", "qwen2_shared", "deepseek", "phimoe"])
def test_compile_fullgraph_matches_eager(name, device):
    torch._dynamo.reset()
    layer = make(name, device)
    x = torch.randn(B, S, D, device=device)
    g = torch.randn(B, S, D, device=device)

    def step(fn):
        torch.manual_seed(7)  # the same jitter noise in both runs
        out = fwd_bwd(fn, layer, x, g)
        return out, layer.router.load_since_update, layer.last_stats

    load = layer.router.load_since_update
    load0 = None if load is None else load.clone()
    eager = step(run_layer(layer))
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = step(run_layer(compiled_layer))
    (out, losses, grads), load, stats = got
    (e_out, e_losses, e_grads), e_load, e_stats = eager
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(losses, e_losses)
    for a, b in zip(grads, e_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(stats, e_stats)
    if load0 is not None:  # both runs accumulated their counts into the buffer
        torch.testing.assert_close(load, load0 + 2 * stats["tokens_per_expert"].long())


# ------------------------------------------------------------------------ bad configurations


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=9), "k=9"),
    (dict(k=0), "k=0"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0"),
    (dict(n_group=3), "n_group=3"),
    (dict(n_group=4, topk_group=5), "topk_group=5"),
    (dict(n_group=4, topk_group=1, k=3), "k=3"),
    (dict(score="relu"), "score"),
    (dict(activation="tanh"), "activation"),
    (dict(jitter_eps=1.5), "jitter_eps"),
    (dict(shared_gate=True), "shared_gate"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(score="sparsemixer", k=3), "k=2"),
    (dict(score="sparsemixer", renormalize=True), "renormalize"),
    (dict(score="sparsemixer", bias_balancing=True), "bias_balancing"),
    (dict(score="sparsemixer", n_group=2), "n_group"),
    (dict(score="sparsemixer", sparsemixer_eps=-1.0), "sparsemixer_eps"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeyard.TopKMoE(D, I, E, **kwargs)


def test_hidden_size_mismatch_raises():
    layer = make("mixtral")
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(B, S, D + 1))


@pytest.mark.parametrize("name", ["switch", "deepseek"])
def test_empty_batch(name):
    layer = make(name)
    x = torch.randn(0, S, D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    (out.sum() + moeyard.collect_aux_losses(layer)).backward()
    assert layer.last_stats["tokens_per_expert"].sum() == 0


def test_bias_balancer_all_reduces_over_the_group(tmp_path):
    """With torch.distributed initialized the loads are summed over the group (here one gloo
    process: a sum of one) before the update."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        layer = make("deepseek")
        layer(torch.randn(32, D))
        load = layer.router.load_since_update.double()
        bias = layer.router.e_score_correction_bias.clone()
        moeyard.BiasBalancer(layer, rate=0.5).step()
        torch.testing.assert_close(layer.router.e_score_correction_bias,
                                   bias + 0.5 * torch.sign(load.mean() - load).float())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("make", [
    lambda: moeyard.TopKMoE(16, 24, 8, z_loss_coef=1e-3), lambda: moeyard.SwitchMoE(16, 24, 8),
    lambda: moeyard.ReMoE(16, 24, 8), lambda: moeyard.ExpertChoiceMoE(16, 24, 8),
    lambda: moeyard.BaseMoE(16, 24, 8), lambda: moeyard.SmearMoE(16, 24, 8)],
    ids=["topk", "switch", "remoe", "ec", "base", "smear"])
def test_copy_after_training_forward(make):
    """A layer can be deep-copied and pickled after a training forward (its aux losses hold the
    graph); the copy has the same parameters and starts without the last forward's outputs."""
    layer = make().train()
    layer(torch.randn(2, 8, 16)).sum().backward()
    assert layer.last_stats
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.aux_losses == {} and other.last_stats == {}
        for (n, a), (_, b) in zip(layer.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), n


def test_aux_loss_default_follows_the_method():
    """Loss-Free Balancing means no auxiliary loss: bias_balancing=True defaults the Switch loss's
    coefficient to 0; an explicit coefficient still gives the hybrid; without bias balancing the
    default stays 1e-2. The presets say what each paper used."""
    x = torch.randn(64, 32)
    assert moeyard.TopKMoE(32, 16, 8, k=2, bias_balancing=True).aux_loss_coef == 0
    lfb = moeyard.TopKMoE(32, 16, 8, k=2, score="sigmoid", bias_balancing=True)
    lfb(x)
    assert lfb.aux_losses == {}
    hybrid = moeyard.TopKMoE(32, 16, 8, k=2, bias_balancing=True, aux_loss_coef=1e-3)
    hybrid(x)
    assert set(hybrid.aux_losses) == {"balance"}
    assert moeyard.TopKMoE(32, 16, 8).aux_loss_coef == 1e-2
    ds = moeyard.TopKMoE.deepseek_v3(32, 16, 8, 2, n_group=4, topk_group=2)
    assert (ds.aux_loss_coef, ds.seq_aux_loss_coef) == (0.0, 1e-4)
    assert moeyard.TopKMoE.mixtral(32, 16).aux_loss_coef == 1e-3


def test_sigmoid_router_balance_loss_uses_normalized_affinities():
    """score="sigmoid": P_e is the mean of sigmoid(logits) normalized per token (DeepSeek-V3 eq.
    19-20), f_e the pre-drop counts of the biased selection."""
    torch.manual_seed(0)
    E, k = 8, 2
    layer = moeyard.TopKMoE(16, 8, E, k=k, score="sigmoid", renormalize=True,
                            bias_balancing=True, aux_loss_coef=1.0, initializer_range=0.5)
    layer.router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = torch.randn(40, 16)
    layer(x)
    logits = F.linear(x, layer.router.weight)
    experts = moeyard.route(logits, k, "sigmoid", bias=layer.router.e_score_correction_bias)[1]
    f = torch.bincount(experts.flatten().long(), minlength=E).double() / (x.shape[0] * k)
    s = torch.sigmoid(logits.double())
    want = E * (f * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    torch.testing.assert_close(layer.aux_losses["balance"].double(), want, rtol=1e-5, atol=0)
    softmax = E * (f * torch.softmax(logits.double(), -1).mean(0)).sum()
    assert not torch.isclose(softmax, want, rtol=1e-3)


def test_sequence_wise_balance_loss():
    """seq_aux_loss_coef: DeepSeek-V3 eq. 17-20 per sequence of a [B, S, d] input, f from the
    plain top-k of the scores (no selection bias, no group limit), averaged over sequences; a
    [T, d] input is one sequence; the gradient reaches the router."""
    torch.manual_seed(0)
    B, S, d, E, k = 3, 10, 16, 8, 2
    layer = moeyard.TopKMoE.deepseek_v3(d, 8, E, k, n_group=4, topk_group=2, n_shared_experts=0,
                                        seq_aux_loss_coef=1.0, initializer_range=0.5)
    layer.router.e_score_correction_bias.copy_(torch.linspace(0.5, -0.5, E))
    x = torch.randn(B, S, d)
    for inp, sequences in ((x[0], 1), (x, B)):
        layer(inp)
        logits = F.linear(inp.reshape(-1, d), layer.router.weight).double()
        want = naive_seq_balance(logits, k, sequences, sigmoid=True)
        torch.testing.assert_close(layer.aux_losses["seq_balance"].double(), want, rtol=1e-5,
                                   atol=0)
    # f counts the plain top-k, not the biased group-limited selection the layer routes by
    biased = layer.router(x.reshape(-1, d))[2].long()
    q = normalized_scores(logits, sigmoid=True)
    f = torch.stack([torch.bincount(biased[b * S:(b + 1) * S].flatten(), minlength=E)
                     for b in range(B)]).double() * E / (k * S)
    with_bias = (f * q.view(B, S, E).mean(1)).sum(-1).mean()
    assert not torch.isclose(with_bias, want, rtol=1e-3)
    layer.aux_losses["seq_balance"].backward()
    assert layer.router.weight.grad.abs().sum() > 0
