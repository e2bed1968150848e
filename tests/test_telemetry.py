"""Routing telemetry (moeyard.telemetry): what a recorder keeps equals what each layer computed
(its router rerun by hand), recording off changes nothing and registers nothing, recording reads
nothing on the host, the reductions against hand-computed values, BASE / SMEAR / Hugging Face
SparseMoeBlock records, and torch.compile(fullgraph=True) with recording off."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeyard
from moeyard import telemetry
from moeyard.telemetry import RoutingRecord
from conftest import host_reads

D, I, E = 16, 24, 4


def make(name):
    """A layer of each kind, set so that its records are not trivial (drops, inactive slots)."""
    return {
        "topk": lambda: moeyard.TopKMoE(D, I, E, k=2, capacity_factor=0.5, min_capacity=1),
        "deepseek": lambda: moeyard.TopKMoE.deepseek_v3(D, I, E, k=2, n_group=2, topk_group=1),
        "switch": lambda: moeyard.SwitchMoE(D, I, E, capacity_factor=0.5, min_capacity=1,
                                            jitter_eps=0.0),
        "remoe": lambda: moeyard.ReMoE(D, I, E, k=1),
        "expert-choice": lambda: moeyard.ExpertChoiceMoE(D, I, E, capacity_factor=1.0),
        "base": lambda: moeyard.BaseMoE(D, I, E),
        "smear": lambda: moeyard.SmearMoE(D, I, E, expert_dropout=0.0),
    }[name]()


ROUTED = ["topk", "deepseek", "switch", "remoe", "expert-choice", "base"]
ALL = ROUTED + ["smear"]


def by_hand(layer, h):
    """(logits, experts, weights, plan) of a routed layer's forward on tokens ``h [T, d]``,
    recomputed from its parameters with moeyard's public ops."""
    T = h.shape[0]
    if isinstance(layer, moeyard.ExpertChoiceMoE):
        logits = F.linear(h.float(), layer.router.weight.float())
        weights, experts, p = moeyard.expert_choice(torch.softmax(logits, -1), layer.capacity(T))
        return logits, experts, weights, p
    if isinstance(layer, moeyard.BaseMoE):
        logits = F.linear(h.float(), layer.expert_centroids.float())
        if layer.training:
            experts = moeyard.balanced_assignment(logits)
        else:
            experts = logits.argmax(-1, keepdim=True).int()
        weights = torch.sigmoid(logits.gather(1, experts.long()))
        return logits, experts, weights, moeyard.plan(experts, E)
    r = layer.router
    logits = F.linear(h.float(), r.weight.float())
    if isinstance(layer, moeyard.ReMoE):
        weights, experts = moeyard.relu_route(logits, r.k_max)
    else:
        weights, experts = moeyard.route(logits, r.k, r.score, bias=r.e_score_correction_bias,
                                         n_group=r.n_group, topk_group=r.topk_group,
                                         renormalize=r.renormalize, scale=r.scale)
    return logits, experts, weights, moeyard.plan(experts, E, layer.capacity(T))


class Net(nn.Module):
    """Two MoE layers under nested names, one elsewhere, and a dense layer."""

    def __init__(self, name):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": make(name)}) for _ in range(2))
        self.head = nn.Linear(D, D)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["mlp"](x)
        return self.head(x)


# ------------------------------------------------------------------------- what is recorded


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ROUTED)
def test_records_equal_what_the_layer_computed(name, training):
    net = Net(name).train(training)
    x = torch.randn(3, 5, D)
    with moeyard.record_routing(net) as rec:
        net(x)
        net(x)
    assert rec.layers == ["blocks.0.mlp", "blocks.1.mlp"]
    h = x.reshape(-1, D)
    for i, block in enumerate(net.blocks):
        layer = block["mlp"]
        records = rec[f"blocks.{i}.mlp"]
        assert len(records) == 2  # one per forward
        r = records[-1]
        logits, experts, weights, p = by_hand(layer, h)
        assert r.training is training and r.num_experts == E
        torch.testing.assert_close(r.logits, logits)
        assert torch.equal(r.experts, experts)
        torch.testing.assert_close(r.weights, weights.to(r.weights.dtype))
        assert torch.equal(r.counts, p.counts)
        assert torch.equal(r.counts, layer.last_stats["tokens_per_expert"])
        assert torch.equal(r.dropped, (p.token_row < 0) & (experts >= 0))
        for t in (r.logits, r.weights):
            assert not t.requires_grad
        if name == "base":
            assert torch.equal(r.extra["assignment"], experts)
        else:
            assert r.extra == {}
        h = (h + layer(h)).detach()  # the next block's input
    if name in ("topk", "switch") and training:  # the capacity dropped something
        assert any(bool(r.dropped.any()) for rs in rec.records.values() for r in rs)
    if name == "remoe":
        assert any(bool((r.experts < 0).any()) for rs in rec.records.values() for r in rs)


def test_smear_records_its_probabilities():
    net = Net("smear").eval()
    x = torch.randn(3, 5, D)
    with moeyard.record_routing(net) as rec:
        net(x)
    layer = net.blocks[0]["mlp"]
    r = rec["blocks.0.mlp"][0]
    assert r.logits is r.experts is r.weights is r.counts is r.dropped is None
    assert set(r.extra) == {"probs"} and r.num_experts == E
    torch.testing.assert_close(r.extra["probs"], layer.router(x))
    assert torch.equal(r.top1(), layer.router(x).argmax(-1))
    torch.testing.assert_close(rec.entropy("blocks.0.mlp")[0], layer.last_stats["entropy"])
    with pytest.raises(ValueError, match="SMEAR"):
        rec.load("blocks.0.mlp")
    # per-example domains: row d is the mean routing distribution of domain d's examples
    dist = moeyard.domain_distribution(r, torch.tensor([1, 0, 1]), 3)
    probs = r.extra["probs"]
    torch.testing.assert_close(dist, torch.stack([probs[1], (probs[0] + probs[2]) / 2,
                                                  torch.zeros(E)]))


def test_fields_keep_only_what_is_asked():
    net = Net("base").train()
    with moeyard.record_routing(net, fields=("counts", "assignment")) as rec:
        net(torch.randn(2, 6, D))
    r = rec["blocks.1.mlp"][0]
    assert r.counts is not None and set(r.extra) == {"assignment"}
    assert r.logits is r.experts is r.weights is r.dropped is None


def test_names_model_root_and_outside_layers():
    layer, other = make("topk"), make("topk")
    x = torch.randn(8, D)
    with moeyard.record_routing(layer) as rec:
        layer(x)
        other(x)  # not in the watched model: ignored
    assert rec.layers == [""] and len(rec[""]) == 1
    assert "" in rec and "other" not in rec
    # two recorders at once, each sees its own model; re-entering accumulates; clear forgets
    net = Net("topk")
    outer = moeyard.RoutingRecorder(net, fields=("counts",))
    with outer, moeyard.record_routing(net.blocks[1]) as inner:
        net(x)
    with outer:
        net(x)
    assert [len(outer[n]) for n in outer.layers] == [2, 2]
    assert inner.layers == ["mlp"] and len(inner["mlp"]) == 1
    outer.clear()
    assert outer.layers == []


# --------------------------------------------------------------------- off: nothing changes


def _hooks(model):
    from torch.nn.modules import module as m
    return ([len(x._forward_hooks) + len(x._forward_pre_hooks) + len(x._backward_hooks)
             for x in model.modules()],
            [len(d) for d in (m._global_forward_hooks, m._global_forward_pre_hooks,
                              m._global_backward_hooks)])


@pytest.mark.parametrize("name", ALL)
def test_recording_changes_nothing_and_registers_nothing(name):
    net = Net(name).train()
    x = torch.randn(2, 6, D, requires_grad=True)
    before = _hooks(net)

    def run():
        torch.manual_seed(5)  # the same jitter / expert dropout draws
        out = net(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()],
                                    allow_unused=True)
        return out, grads

    plain = run()
    with moeyard.record_routing(net) as rec:
        assert _hooks(net) == before and telemetry._ACTIVE == [rec]
        recorded = run()
    assert rec.layers and _hooks(net) == before and telemetry._ACTIVE == []
    assert torch.equal(plain[0], recorded[0])
    for a, b in zip(plain[1], recorded[1]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_off_touches_nothing_and_an_error_stops_recording():
    class Exploding:  # any use of a reported value would raise
        def __getattr__(self, name):
            raise AssertionError(f"touched .{name}")

    telemetry.report_routing(nn.Linear(1, 1), logits=Exploding(), experts=Exploding(),
                             plan=Exploding(), anything=Exploding())
    net = Net("topk")
    with pytest.raises(RuntimeError, match="inside"):
        with moeyard.record_routing(net):
            raise RuntimeError("inside")
    assert telemetry._ACTIVE == []


# ------------------------------------------------------------------------- no host reads


@pytest.mark.parametrize("name", ALL)
def test_recording_reads_nothing_on_the_host(name):
    net = Net(name).train()
    x = torch.randn(2, 6, D, requires_grad=True)
    net(x).sum().backward()  # warm-up
    with host_reads() as off:
        net(x).sum().backward()
    with host_reads() as on:
        with moeyard.record_routing(net) as rec:
            net(x).sum().backward()
            net(x)
        # and the reductions stay on the device too
        for n in rec.layers:
            rec.entropy(n)
            a, b = rec[n]
            moeyard.routing_fluctuation(a, b)
            labels = torch.arange(a.extra["probs"].shape[0] if name == "smear" else 12) % 3
            moeyard.domain_distribution([a, b], [labels, labels], 3)
            if name != "smear":
                rec.max_violation(n)
                rec.load(n).sum(0)
    assert on == off == [], (on, off)


# ------------------------------------------------------------------------------ reductions


def test_max_violation_by_hand():
    load = torch.tensor([[4, 0, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0], [1, 0, 0, 0]],
                        dtype=torch.int32)
    # (max - mean) / mean: (4 - 2) / 2, 0, no load at all, (1 - 1/4) / (1/4)
    torch.testing.assert_close(moeyard.max_violation(load), torch.tensor([1.0, 0.0, 0.0, 3.0]))
    torch.testing.assert_close(moeyard.max_violation(load.sum(0)), torch.tensor(7 / 4.25 - 1))
    p = moeyard.plan(torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]], dtype=torch.int32), 4)
    torch.testing.assert_close(moeyard.load_stats(p)["max_violation"],
                               torch.tensor((4 - 2) / 2))


def test_recorder_load_and_max_violation():
    layer = make("topk").eval()
    with moeyard.record_routing(layer) as rec:
        for T in (8, 8, 8):
            layer(torch.randn(T, D))
    load = rec.load("")
    assert load.shape == (3, E) and load.dtype == torch.int32
    assert torch.equal(load.sum(1), torch.full((3,), 8 * 2, dtype=torch.int32))
    assert torch.equal(load[-1], layer.last_stats["tokens_per_expert"])
    torch.testing.assert_close(rec.max_violation("")[-1], layer.last_stats["max_violation"])
    assert torch.equal(moeyard.expert_load(rec[""][:2]), load[:2])
    with pytest.raises(ValueError, match="at least one"):
        moeyard.expert_load([])


def test_routing_entropy_by_hand():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    want = (0 + torch.log(torch.tensor(4.0)) + torch.log(torch.tensor(2.0))) / 3
    torch.testing.assert_close(moeyard.routing_entropy(probs), want)
    assert moeyard.routing_entropy(torch.zeros(0, 4)) == 0
    # a record's: the softmax of its logits per token
    r = RoutingRecord(training=False, num_experts=2, logits=torch.tensor([[0.0, 0.0],
                                                                           [100.0, 0.0]]))
    torch.testing.assert_close(moeyard.routing_entropy(r.distribution()),
                               torch.log(torch.tensor(2.0)) / 2)


def test_top1_and_routing_fluctuation_by_hand():
    # top-k order (best first), expert-choice order (by id, -1 after), a token with none
    r = RoutingRecord(training=False, num_experts=4,
                      experts=torch.tensor([[3, 1], [0, 2], [1, -1], [-1, -1]]),
                      weights=torch.tensor([[0.6, 0.4], [0.2, 0.7], [0.9, 0.0], [0.0, 0.0]]))
    assert r.top1().tolist() == [3, 2, 1, -1]
    s = RoutingRecord(training=False, num_experts=4,
                      experts=torch.tensor([[1, 3], [2, 0], [-1, -1], [2, -1]]),
                      weights=torch.tensor([[0.5, 0.5], [0.8, 0.2], [0.0, 0.0], [0.3, 0.0]]))
    assert s.top1().tolist() == [1, 2, -1, 2]  # a tie goes to the earlier slot
    # tokens 0, 2 and 3 changed their target expert, token 1 did not
    torch.testing.assert_close(moeyard.routing_fluctuation(r, s), torch.tensor(0.75))
    torch.testing.assert_close(moeyard.routing_fluctuation(r, r), torch.tensor(0.0))
    torch.testing.assert_close(moeyard.routing_fluctuation(torch.tensor([0, 1, 2, 3]),
                                                           torch.tensor([0, 2, 2, 1])),
                               torch.tensor(0.5))
    with pytest.raises(ValueError, match="same inputs"):
        moeyard.routing_fluctuation(torch.zeros(3), torch.zeros(4))
    k1 = RoutingRecord(training=True, num_experts=4, experts=torch.tensor([[2], [0]]))
    assert k1.top1().tolist() == [2, 0]  # k = 1 needs no weights


def test_fluctuation_of_a_layer_that_routes_the_same_is_zero():
    layer = make("deepseek").eval()
    x = torch.randn(16, D)
    with moeyard.record_routing(layer) as rec:
        layer(x)
        layer(x)
        with torch.no_grad():
            layer.router.weight.neg_()  # a different router: most tokens move
        layer(x)
    a, b, c = rec[""]
    assert moeyard.routing_fluctuation(a, b) == 0
    assert moeyard.routing_fluctuation(b, c) > 0.5


def test_domain_distribution_by_hand():
    # tokens 0, 1 in domain 0; token 2 in domain 2; domain 1 has none. -1 slots do not count.
    r = RoutingRecord(training=False, num_experts=3,
                      experts=torch.tensor([[0, 1], [0, -1], [2, 1]]))
    got = moeyard.domain_distribution(r, torch.tensor([0, 0, 2]), 3)
    want = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(got, want)
    # several records (forwards) add up; labels in the input's [B, S] shape
    both = moeyard.domain_distribution([r, r], [torch.tensor([[0, 0, 2]])] * 2, 3)
    torch.testing.assert_close(both, want)
    with pytest.raises(ValueError, match="labels"):
        moeyard.domain_distribution(r, torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="one domain tensor per record"):
        moeyard.domain_distribution([r, r], [torch.tensor([0, 0, 2])], 3)


# ------------------------------------------------------------------------ Hugging Face


def test_hf_sparse_moe_block_records():
    pytest.importorskip("transformers")
    import moeyard.hf as mh
    from test_hf import tiny_model
    model = tiny_model("qwen3_moe")
    names = mh.replace_moe(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    inputs = {}

    def keep_input(module, args):
        inputs[module] = args[0].reshape(-1, args[0].shape[-1])

    blocks = [model.get_submodule(n) for n in names]
    handles = [b.register_forward_pre_hook(keep_input) for b in blocks]
    with moeyard.record_routing(model) as rec:
        model(ids)
    for h in handles:
        h.remove()
    assert rec.layers == names
    for name, block in zip(names, blocks):
        [r] = rec[name]
        logits, weights, experts = block.hf_router()(inputs[block])
        torch.testing.assert_close(r.logits, logits.detach())
        assert torch.equal(r.experts, experts)
        torch.testing.assert_close(r.weights, weights.detach().to(r.weights.dtype))
        assert torch.equal(r.counts, block.last_stats["tokens_per_expert"])
        assert not r.dropped.any() and r.num_experts == block.num_experts


# --------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_with_recording_off():
    torch._dynamo.reset()
    net = nn.Sequential(*(make(n) for n in ALL)).eval()
    x = torch.randn(2, 6, D)
    with moeyard.record_routing(net) as rec:  # a recorder that has been on and is off again
        want = net(x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want)
    with moeyard.record_routing(net), pytest.raises(Exception, match="record_routing"):
        compiled(x)  # fullgraph cannot record: it says so
    # on, a compiled model records outside its graphs (a graph break; fullgraph would refuse)
    graph_broken = torch.compile(net[:2], backend="aot_eager")
    with moeyard.record_routing(net) as on:
        graph_broken(x)
    assert on.layers == ["0", "1"]
    for n in on.layers:
        assert torch.equal(on[n][0].experts, rec[n][0].experts)
