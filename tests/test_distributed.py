"""Expert parallelism (moeyard.distributed) on real gloo process groups (CPU), world sizes 2 and 4.

Every check runs in all ranks of one spawn per world size (tests/ranks.py) and compares each rank
with a single-process reference computed inside the rank from the same seeds: the full layer is
built identically on every rank and then sharded, and every rank can draw every rank's inputs, so
references over the whole global batch need no communication."""
import copy
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

import moeyard
import moeyard.distributed as md
from conftest import host_reads
from ranks import run_checks

pytestmark = pytest.mark.distributed

E, D, I = 8, 16, 24
FP32 = dict(rtol=1e-5, atol=1e-6)


def _inputs(rank, T, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(T, D, generator=g).to(device, dtype)


def _build(device, cls, *args, seed=0, **kwargs):
    """(full layer, its expert-parallel copy over the world) from the same seed."""
    torch.manual_seed(seed)
    full = cls(*args, **kwargs).to(device)
    return full, md.shard_experts(copy.deepcopy(full))


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _assert_same(ep, full, x, **tol):
    """Output and every aux loss / load statistic of one forward agree."""
    torch.testing.assert_close(ep(x), full(x), **(tol or FP32))
    assert ep.aux_losses.keys() == full.aux_losses.keys()
    for name in full.aux_losses:
        torch.testing.assert_close(ep.aux_losses[name], full.aux_losses[name], **FP32)
    for name in full.last_stats:
        torch.testing.assert_close(ep.last_stats[name], full.last_stats[name], **FP32)


# ------------------------------------------------------------------------------- all-to-all


def check_all_to_all(rank, ws, device):
    """Uneven splits with zeros (a rank that sends nothing, one that receives nothing) in several
    dtypes; the backward is the swapped exchange: with dL/d(out on rank r) = (r + 1) * out, every
    sent row gets (destination + 1) * itself."""
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(0, 4, (ws, ws), generator=g)
    sizes[0] = 0        # rank 0 sends nothing
    sizes[:, -1] = 0    # the last rank receives nothing
    for dtype in (torch.float32, torch.bfloat16, torch.int32):
        # row i of what src sends to dst holds (src, dst, i): small integers, exact in bf16
        rows = [torch.tensor([[rank, dst, i] for i in range(int(sizes[rank, dst]))],
                             dtype=torch.float32).view(-1, 3) for dst in range(ws)]
        x = torch.cat(rows).to(device, dtype)
        want = torch.cat([torch.tensor([[src, rank, i] for i in range(int(sizes[src, rank]))],
                                       dtype=torch.float32).view(-1, 3) for src in range(ws)])
        if dtype.is_floating_point:
            x.requires_grad_()
        out = md.all_to_all(x, sizes[:, rank].tolist(), sizes[rank].tolist())
        assert out.dtype == dtype
        torch.testing.assert_close(out.float().cpu(), want, rtol=0, atol=0)
        if dtype.is_floating_point:
            out.backward(out.detach() * (rank + 1))
            factor = torch.cat([torch.full((int(sizes[rank, d]), 1), d + 1.0) for d in range(ws)])
            torch.testing.assert_close(x.grad.float().cpu(), x.detach().float().cpu() * factor,
                                       rtol=0, atol=0)
    # equal splits (None)
    x = torch.arange(ws * 2, dtype=torch.float32).view(ws * 2, 1) + 100 * rank
    out = md.all_to_all(x.to(device)).cpu()
    want = torch.cat([torch.tensor([[2.0 * rank], [2.0 * rank + 1]]) + 100 * s for s in range(ws)])
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def check_group_of_one(rank, ws, device):
    """A group of one rank: the exchange is the identity and the layer equals the unsharded one."""
    ones = [dist.new_group([r]) for r in range(ws)]  # every rank creates every group, in order
    mine = ones[rank]
    x = _inputs(rank, 9, device=device)
    assert md.all_to_all(x, group=mine) is x
    for cf in (None, 1.0):
        torch.manual_seed(0)
        full = moeyard.TopKMoE(D, I, E, k=2, capacity_factor=cf, min_capacity=1).to(device)
        ep = md.shard_experts(copy.deepcopy(full), mine)
        assert ep.experts.num_experts == E
        _assert_same(ep, full, x)


# ------------------------------------------------------------------------ forward per mode


def check_dropless_forward(rank, ws, device):
    """Dropless: each rank equals the single-device layer on its tokens; rank 1 has none, some
    experts get none; with a selection bias every token goes to rank 0's experts (the other
    ranks receive nothing)."""
    for k in (1, 2):
        full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=k, shared_intermediate_size=8,
                          expert_bias=True)
        _assert_same(ep, full, _inputs(rank, 0 if rank == 1 else 9, device=device))
        full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=k, bias_balancing=True)
        for m in (full, ep):
            m.router.e_score_correction_bias[:E // ws] = 100.0
        _assert_same(ep, full, _inputs(rank, 0 if rank == 1 else 9, device=device))


def check_device_mesh(rank, ws, device):
    """A 1-D DeviceMesh names the group as well as a ProcessGroup does."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device, (ws,))
    torch.manual_seed(0)
    full = moeyard.TopKMoE(D, I, E, k=2, capacity_factor=1.0, min_capacity=1).to(device)
    ep = md.shard_experts(copy.deepcopy(full), mesh)
    assert ep.experts.ep.group is not None and ep.experts.ep.size == ws
    _assert_same(ep, full, _inputs(rank, 8, device=device))


def check_capacity_forward(rank, ws, device):
    """Capacity: C from the local token count, the same drops per (rank, expert) as the
    single-device layer (outputs of dropped tokens 0 in both), in training and eval."""
    for k, cf in ((1, 1.0), (2, 0.5), (2, 2.0)):
        full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=k, capacity_factor=cf,
                          eval_capacity_factor=cf, min_capacity=1, expert_bias=True)
        x = _inputs(rank, 12, device=device)
        _assert_same(ep, full, x)
        if cf < 1:
            assert float(full.last_stats["dropped_fraction"]) > 0
        full.eval(), ep.eval()
        _assert_same(ep, full, x)


def check_bf16(rank, ws, device):
    """bf16 in both modes, against the single-device layer in bf16."""
    for cf in (None, 1.0):
        full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=2, capacity_factor=cf, min_capacity=1)
        full, ep = full.to(torch.bfloat16), ep.to(torch.bfloat16)
        x = _inputs(rank, 10, dtype=torch.bfloat16, device=device)
        torch.testing.assert_close(ep(x).float(), full(x).float(), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------- training


def _grad_out(shape, seed, device):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _reference_grads(full, ws, T, g_seed, device):
    """Gradients of (1/W) sum_r (<full(x_r), g_r> + aux_r): each rank's loss a local quantity,
    averaged over the data-parallel ranks, as DDP does."""
    xs = [_inputs(r, T, device=device).requires_grad_() for r in range(ws)]
    loss = 0
    for r, x in enumerate(xs):
        out = full(x)
        g = _grad_out(out.shape, g_seed + r, device)
        loss = loss + ((out * g).sum() / T + moeyard.collect_aux_losses(full)) / ws
    loss.backward()
    return xs


def check_backward(rank, ws, device):
    """One training step's gradients: x, the router and the shared expert (averaged by
    sync_gradients) and the experts (local slices, divided by sync_gradients) equal the
    single-device gradients of the mean of the ranks' losses; in both modes, with biases."""
    T = 10
    for cf in (None, 0.75):
        full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=2, capacity_factor=cf,
                          min_capacity=1, shared_intermediate_size=8, expert_bias=True,
                          z_loss_coef=1e-3)
        xs = _reference_grads(full, ws, T, 50, device)
        x = _inputs(rank, T, device=device).requires_grad_()
        out = ep(x)
        g = _grad_out(out.shape, 50 + rank, device)
        ((out * g).sum() / T + moeyard.collect_aux_losses(ep)).backward()
        md.sync_gradients(ep)
        torch.testing.assert_close(x.grad, xs[rank].grad * ws, **FP32)
        sharded = {name for name, _ in md.expert_parameters(ep)}
        assert sharded == {"experts.gate_up_proj", "experts.down_proj",
                           "experts.gate_up_proj_bias", "experts.down_proj_bias"}
        _assert_grads(ep, full, sharded)
        # clipping by the norm over every rank's experts: as the single-device clip
        norm = md.clip_grad_norm_(ep, 1e-3)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(full.parameters(), 1e-3),
                                   **FP32)
        _assert_grads(ep, full, sharded)


def _assert_grads(ep, full, sharded):
    """Every parameter's gradient in ``ep`` equals ``full``'s (its local slice if sharded)."""
    want = dict(full.named_parameters())
    for name, p in ep.named_parameters():
        ref = want[name].grad
        if name in sharded:
            ref = ref[ep.experts.ep.local_experts]
        torch.testing.assert_close(p.grad, ref, **FP32, msg=lambda m: f"{name}: {m}")


def check_backward_ep_within_dp(rank, ws, device):
    """EP 2 inside a world of 4 (experts replicated over two EP groups): with expert_data_group,
    sync_gradients gives the single-device gradients of the mean of all four ranks' losses."""
    if ws != 4:
        return
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    T = 10
    torch.manual_seed(0)
    full = moeyard.TopKMoE(D, I, E, k=2, shared_intermediate_size=8).to(device)
    ep = md.shard_experts(copy.deepcopy(full), ep_groups[rank // 2])
    xs = _reference_grads(full, ws, T, 60, device)
    x = _inputs(rank, T, device=device).requires_grad_()
    out = ep(x)
    ((out * _grad_out(out.shape, 60 + rank, device)).sum() / T
     + moeyard.collect_aux_losses(ep)).backward()
    md.sync_gradients(ep, expert_data_group=data_groups[rank % 2])
    torch.testing.assert_close(x.grad, xs[rank].grad * ws, **FP32)
    _assert_grads(ep, full, {name for name, _ in md.expert_parameters(ep)})


def check_balance_group(rank, ws, device):
    """Global-batch balance loss: f from the counts of every rank's tokens, P from the local
    ones; the mean over ranks equals the loss of the concatenated batch (equal T)."""
    T = 11
    full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=2, aux_loss_coef=1.0,
                      balance_group=dist.group.WORLD)
    ep(_inputs(rank, T, device=device))
    counts = torch.zeros(E, device=device)
    probs = []
    for r in range(ws):
        logits, _, experts = full.router(_inputs(r, T, device=device))
        counts += torch.bincount(experts.flatten().long(), minlength=E)
        probs.append(torch.softmax(logits, -1).mean(0))
    f = counts / (ws * T * 2)
    want = E * (f * probs[rank]).sum()
    torch.testing.assert_close(ep.aux_losses["balance"], want, **FP32)
    mean = sum(_gather(ep.aux_losses["balance"].detach().view(1))) / ws
    full.balance_group = None
    full(torch.cat([_inputs(r, T, device=device) for r in range(ws)]))
    torch.testing.assert_close(mean[0], full.aux_losses["balance"].detach(), **FP32)


def check_bias_balancer(rank, ws, device):
    """Auxiliary-loss-free balancing: the loads are counted before the capacity drops on the
    sending rank, summed over ranks by BiasBalancer, and the biases stay bitwise identical."""
    T = 12
    full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=2, bias_balancing=True,
                      capacity_factor=0.5, min_capacity=1, aux_loss_coef=0.0)
    ep(_inputs(rank, T, device=device)).sum().backward()
    assert float(ep.last_stats["dropped_fraction"]) > 0
    moeyard.BiasBalancer(ep, rate=1e-2).step()
    bias = ep.router.e_score_correction_bias
    for other in _gather(bias):
        assert torch.equal(other, bias)
    load = sum(torch.bincount(full.router(_inputs(r, T, device=device))[2].flatten().long(),
                              minlength=E) for r in range(ws))
    want = torch.zeros(E, device=device)
    moeyard.update_expert_bias(want, load, 1e-2)
    assert torch.equal(bias, want)


# --------------------------------------------------------------------------- other routers


def check_remoe(rank, ws, device):
    """ReMoE (variable experts per token, -1 slots): dropless and with a capacity, forward (the
    L1 loss too) and the x gradient."""
    for cf in (None, 1.0):
        full, ep = _build(device, moeyard.ReMoE, D, I, E, k=2, capacity_factor=cf, min_capacity=1)
        for m in (full, ep):  # a positive router bias so that tokens do use experts
            m.router.weight.data.add_(0.05)
        x = _inputs(rank, 9, device=device)
        _assert_same(ep, full, x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        full(xa).sum().backward(), ep(xb).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, **FP32)


def check_expert_choice(rank, ws, device):
    """Expert choice: each expert takes its top C of every rank's tokens (capacity mode)."""
    full, ep = _build(device, moeyard.ExpertChoiceMoE, D, I, E, capacity_factor=2.0)
    _assert_same(ep, full, _inputs(rank, 12, device=device))


def check_base(rank, ws, device):
    """BASE: training (balanced assignment of the local batch, capacity ceil(T/E), sync-free)
    and eval (greedy, dropless)."""
    torch.manual_seed(0)
    full = moeyard.BaseMoE(D, I, E)
    torch.nn.init.normal_(full.experts.down_proj, std=0.02)  # so that the experts contribute
    ep = md.shard_experts(copy.deepcopy(full))
    for T in (16, 13):
        _assert_same(ep, full, _inputs(rank, T, device=device))
    full.eval(), ep.eval()
    _assert_same(ep, full, _inputs(rank, 13, device=device))


# ------------------------------------------------------------------------ sync, compile, state


@contextmanager
def _sync_errors(device):
    """On CUDA, torch's own detector: any synchronizing call raises."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_host_syncs(rank, ws, device):
    """Capacity mode reads nothing on the host, forward or backward (after the first forward's
    agreement check); dropless reads exactly one thing per forward (the split sizes) and nothing
    in the backward."""
    kw = dict(ep_group=dist.group.WORLD, device=device)
    layers = [moeyard.TopKMoE(D, I, E, k=2, capacity_factor=1.0, **kw),
              moeyard.SwitchMoE(D, I, E, **kw),
              moeyard.ReMoE(D, I, E, capacity_factor=1.0, **kw),
              moeyard.ExpertChoiceMoE(D, I, E, **kw),
              moeyard.BaseMoE(D, I, E, **kw)]
    x = _inputs(rank, 16, device=device).requires_grad_()
    for layer in layers:
        layer(x).sum().backward()  # warm-up: the agreement check
        with host_reads() as reads, _sync_errors(device):
            layer(x).sum().backward()
        assert reads == [], f"{type(layer).__name__}: host reads {reads}"
    dropless = moeyard.TopKMoE(D, I, E, k=2, **kw)
    dropless(x)
    with host_reads() as reads:
        out = dropless(x)
    assert reads == ["tolist"], reads
    with host_reads() as reads, _sync_errors(device):
        out.sum().backward()
    assert reads == [], reads


def check_compile(rank, ws, device):
    """Capacity mode under torch.compile(fullgraph=True) (aot_eager on CPU) equals eager, forward
    and backward. World size 2 on CPU only (compiling in 4 processes on 2 cores is slow)."""
    if ws != 2 or device != "cpu":
        return
    _, ep = _build(device, moeyard.TopKMoE, D, I, E, k=2, capacity_factor=1.0, min_capacity=1)
    x = _inputs(rank, 12, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = ep(xa)
    want.sum().backward()
    eager = [p.grad.clone() for p in ep.parameters()]
    ep.zero_grad()
    got = torch.compile(ep, backend="aot_eager", fullgraph=True)(xb)
    got.sum().backward()
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(xb.grad, xa.grad, **FP32)
    for a, b in zip(eager, (p.grad for p in ep.parameters())):
        torch.testing.assert_close(b, a, **FP32)


def check_state_dicts(rank, ws, device):
    """full_state_dict gathers the experts (loads into the unsharded layer), load_full_state_dict
    keeps the local slice; a layer built with ep_group has distinct experts and identical
    replicated parameters on every rank; deepcopy keeps the exchange."""
    full, ep = _build(device, moeyard.TopKMoE, D, I, E, k=2, expert_bias=True)
    sd = md.full_state_dict(ep)
    ref = full.state_dict()
    assert sd.keys() == ref.keys()
    for key in ref:
        assert torch.equal(sd[key], ref[key]), key
    torch.manual_seed(rank)  # different on every rank: the loaded values must win
    fresh = moeyard.TopKMoE(D, I, E, k=2, expert_bias=True, ep_group=dist.group.WORLD,
                            device=device)
    md.load_full_state_dict(fresh, ref)
    x = _inputs(rank, 9, device=device)
    torch.testing.assert_close(fresh(x), full(x), **FP32)
    torch.testing.assert_close(copy.deepcopy(fresh)(x), full(x), **FP32)

    torch.manual_seed(3)
    built = moeyard.TopKMoE(D, I, E, k=2, ep_group=dist.group.WORLD, device=device)
    after = torch.rand(4, device=device)
    for other in _gather(after):
        assert torch.equal(other, after)  # every rank drew the same random numbers
    for other in _gather(built.router.weight.detach()):
        assert torch.equal(other, built.router.weight)
    experts = md.full_state_dict(built)["experts.gate_up_proj"].flatten(1)
    assert experts.shape[0] == E
    assert torch.cdist(experts, experts).add(torch.eye(E, device=device)).min() > 0  # distinct


def check_bad_input(rank, ws, device):
    """Clear errors on every rank, never a hang: E not divisible by the group size, ranks
    disagreeing on E, on the local token count in capacity mode, on k or the dtype; SMEAR.
    On the CPU only (nothing here depends on the device)."""
    if device != "cpu":
        return
    world = dist.group.WORLD
    with pytest.raises(ValueError, match="multiple of the expert-parallel group size"):
        moeyard.TopKMoE(D, I, 2 * ws + 1, ep_group=world)
    with pytest.raises(ValueError, match=r"disagree on the experts' shapes.*num_experts=16"):
        moeyard.TopKMoE(D, I, E if rank else 2 * E, ep_group=world)
    layer = moeyard.TopKMoE(D, I, E, k=2, capacity_factor=1.0, ep_group=world)
    with pytest.raises(ValueError, match=r"disagree on the exchange.*tokens=9"):
        layer(_inputs(rank, 8 + (rank == 0)))
    layer(_inputs(rank, 8))  # the group still works afterwards
    k = 1 if rank == ws - 1 else 2
    with pytest.raises(ValueError, match=r"disagree on the exchange.*k=1"):
        moeyard.TopKMoE(D, I, E, k=k, ep_group=world)(_inputs(rank, 5))
    layer = moeyard.TopKMoE(D, I, E, k=2, ep_group=world)
    dtype = torch.bfloat16 if rank == 0 else torch.float32
    with pytest.raises(ValueError, match="disagree on the exchange"):
        layer.to(dtype)(_inputs(rank, 5, dtype=dtype))
    with pytest.raises(ValueError, match="plan routes to 4 experts"):
        layer.experts(_inputs(rank, 3), moeyard.plan(torch.zeros(3, 1, dtype=torch.int32), 4),
                      torch.ones(3, 1))
    with pytest.raises(ValueError, match="SmearMoE cannot be expert-parallel"):
        moeyard.SmearMoE(D, I, E, ep_group=world)
    with pytest.raises(ValueError, match="SMEAR layer"):
        md.shard_experts(torch.nn.Sequential(moeyard.SmearMoE(D, I, E)))


CHECKS = [check_all_to_all, check_group_of_one, check_dropless_forward, check_device_mesh,
          check_capacity_forward, check_bf16, check_backward, check_backward_ep_within_dp,
          check_balance_group, check_bias_balancer, check_remoe, check_expert_choice, check_base,
          check_host_syncs, check_compile, check_state_dicts, check_bad_input]


@pytest.fixture(scope="module", params=[
    pytest.param(("cpu", 2), id="cpu-ws2"), pytest.param(("cpu", 4), id="cpu-ws4"),
    pytest.param(("cuda", 2), id="cuda-ws2", marks=pytest.mark.gpu)])
def results(request):
    """Every check's result on one spawn of ranks; on CUDA two gloo ranks share the GPU."""
    device, world_size = request.param
    return run_checks(CHECKS, world_size, device)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_ep(results, check):
    err = results[check.__name__]
    if err:
        pytest.fail(err, pytrace=False)


def test_without_process_group():
    """Without torch.distributed initialized, ep_group is refused with a message that says so,
    and importing moeyard alone does not import moeyard.distributed."""
    with pytest.raises(RuntimeError, match="init_process_group"):
        moeyard.TopKMoE(D, I, E, ep_group=object())
    code = "import sys, moeyard; assert 'moeyard.distributed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
