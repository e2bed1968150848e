"""moeyard.hf.replace_moe(ep_group=...) on real gloo process groups (CPU): EP groups of 4 and 2.

Every check runs in all ranks of one spawn of 4 ranks (tests/ranks.py), twice: with the world as
the expert-parallel group (P = 4) and with two concurrent groups of two ranks, {0, 1} and {2, 3}
(P = 2, group ranks that differ from the global ones). Importing transformers is what costs here
(~6 s of CPU per process), so one spawn serves both sizes instead of one spawn per size.

Each rank builds the same tiny transformers model (tests/test_hf.py's, same seed), replaces its
blocks unsharded (the reference) and, in a copy, sharded over the group; the reference can run
every rank's inputs, so each rank checks the expert-parallel step against single-device training
on its group's batches locally."""
import copy
import functools
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import transformers

import moeyard.distributed as md
import moeyard.hf as mh
from conftest import close
from ranks import run_checks
from test_hf import TINY, tiny_model

pytestmark = pytest.mark.distributed

E = 8  # tests/test_hf.py's tiny models: 8 experts, top-2, 2 MoE layers
WORLD_SIZE = 4


@functools.cache
def _pair():
    """This rank's group of two ({0, 1} or {2, 3}); every rank creates both, in the same order
    (the first check to ask does, on every rank)."""
    pairs = [dist.new_group([r, r + 1]) for r in range(0, dist.get_world_size(), 2)]
    return pairs[dist.get_rank() // 2]


def _ep_groups():
    """(group, its global ranks) for each expert-parallel group a check runs with: the world
    (P = 4) and this rank's pair (P = 2)."""
    first = dist.get_rank() // 2 * 2
    return [(dist.group.WORLD, list(range(dist.get_world_size()))),
            (_pair(), [first, first + 1])]


def _models(family, group, **options):
    """(the model replaced unsharded, the same model replaced sharded over ``group``)."""
    torch.manual_seed(0)
    full = tiny_model(family)
    ep = copy.deepcopy(full)
    mh.replace_moe(full, **options)
    mh.replace_moe(ep, ep_group=group, **options)
    return full, ep


def _ids(rank, T=12):
    """Rank ``rank``'s input ids (any rank can draw any rank's)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, TINY["vocab_size"], (2, T), generator=g)


def _run(model, ids):
    """Logits and the LM loss (with the router aux loss where the model has one)."""
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    return out.logits, out.loss


def _gathered(t, group):
    """The group's ``t`` concatenated along dim 0 (the full experts of a local slice)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _check_family(family, rank):
    """Logits, gradients after sync_gradients, one SGD step and the full state dict of the
    sharded model against the unsharded one trained on the group's batches (mean loss)."""
    for group, members in _ep_groups():
        P = len(members)
        first = members.index(rank) * E // P
        full, ep = _models(family, group)
        experts = dict(md.expert_parameters(ep))
        assert experts and all(".experts." in n for n in experts)
        assert experts.keys() == {n for n, _ in full.named_parameters() if ".experts." in n}
        local = ep.state_dict()
        assert local.keys() == full.state_dict().keys()
        for name, p in experts.items():  # the local slice, under the same keys
            assert p.shape[0] == E // P and local[name].shape == p.shape
            close(p.detach(), dict(full.named_parameters())[name][first:first + E // P], 0)

        logits, loss = _run(ep, _ids(rank))
        close(logits, _run(full, _ids(rank))[0], 1e-5, scaled=True)
        loss.backward()
        md.sync_gradients(ep, group)
        (sum(_run(full, _ids(r))[1] for r in members) / P).backward()
        for name, p in full.named_parameters():
            q = dict(ep.named_parameters())[name]
            if p.grad is None:
                assert q.grad is None or not q.grad.any(), name
                continue
            got = _gathered(q.grad, group) if name in experts else q.grad
            close(got, p.grad, 1e-5, scaled=True)

        for model in (full, ep):
            torch.optim.SGD(model.parameters(), lr=0.5).step()
        sd = md.full_state_dict(ep)
        for name, t in full.state_dict().items():
            close(sd[name], t, 1e-6, scaled=True)
        reloaded, resharded = _models(family, group)  # both get the trained weights below
        reloaded.load_state_dict(sd)
        md.load_full_state_dict(resharded, full.state_dict())
        want, _ = _run(full, _ids(rank))
        close(_run(reloaded, _ids(rank))[0], want, 1e-5, scaled=True)
        close(_run(resharded, _ids(rank))[0], want, 1e-5, scaled=True)


def check_mixtral(rank, ws):
    _check_family("mixtral", rank)


def check_qwen3_moe(rank, ws):
    _check_family("qwen3_moe", rank)


def check_qwen2_moe_shared_expert(rank, ws):
    _check_family("qwen2_moe", rank)


def check_deepseek_v3(rank, ws):
    _check_family("deepseek_v3", rank)


def check_gpt_oss_biases_transposed(rank, ws):
    _check_family("gpt_oss", rank)


def check_save_pretrained_full_state_dict(rank, ws):
    """Rank 0 saves the sharded model with the gathered state dict; it loads with from_pretrained
    as the unsharded model."""
    full, ep = _models("qwen3_moe", dist.group.WORLD)
    sd = md.full_state_dict(ep)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            ep.save_pretrained(tmp, state_dict=sd)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp)
        mh.replace_moe(loaded)
        close(_run(loaded, _ids(rank))[0], _run(full, _ids(rank))[0], 1e-5, scaled=True)


def check_capacity_is_sync_free(rank, ws):
    """With a capacity factor (training; half the mean load, so tokens are dropped) each rank's
    logits equal the unsharded model's on its tokens, through the exchange's capacity mode (the
    dropless one, with its host sync, never runs)."""
    for group, _ in _ep_groups():
        full, ep = _models("qwen3_moe", group, capacity_factor=0.5, min_capacity=1)
        full.train(), ep.train()
        with mock.patch.object(md.ExpertParallel, "_dropless", side_effect=AssertionError):
            logits, loss = _run(ep, _ids(rank))
            loss.backward()
        close(logits, _run(full, _ids(rank))[0], 1e-5, scaled=True)
        blocks = [m for m in ep.modules() if isinstance(m, mh.SparseMoeBlock)]
        assert blocks and all(b.last_stats["dropped_fraction"] > 0 for b in blocks)


def check_block_with_idle_ranks(rank, ws):
    """One block where the group's first rank sends all its tokens to its own experts (all-zero
    tokens: tied logits pick experts 0 and 1) and the second has none, so the second sends and
    (in a pair) receives nothing: outputs and the experts' gradients (summed over the ranks'
    losses) match. The experts module called directly (the "moeyard" experts implementation)
    runs the exchange too."""
    d = TINY["hidden_size"]

    def tokens(i):  # the group's i-th rank's
        h = torch.randn(1, (5, 0)[i] if i < 2 else 7, d, generator=torch.Generator().manual_seed(i))
        return h * 0 if i == 0 else h

    for group, members in _ep_groups():
        P, i = len(members), members.index(rank)
        full, ep = _models("mixtral", group)
        block, ref = ep.model.layers[0].mlp, full.model.layers[0].mlp
        probe = [torch.randn(tokens(j).shape, generator=torch.Generator().manual_seed(9 + j))
                 for j in range(P)]
        out = block(tokens(i))
        assert out.shape == tokens(i).shape
        if out.numel():
            close(out, ref(tokens(i)), 1e-5, scaled=True)
        (out * probe[i]).sum().backward()
        sum((ref(tokens(j)) * probe[j]).sum() for j in range(P)).backward()
        for name, p in ref.experts.named_parameters():
            close(_gathered(getattr(block.experts, name).grad, group), p.grad, 1e-5, scaled=True)

        h = torch.randn(6, d)
        idx = torch.stack([torch.randperm(E)[:2] for _ in range(h.shape[0])])
        w = torch.rand(h.shape[0], 2)
        close(block.experts(h, idx, w), ref.experts(h, idx, w), 1e-5, scaled=True)
        assert f"experts {i * E // P}..{(i + 1) * E // P - 1} of {E}" in repr(block)


def check_refusals(rank, ws):
    """E not a multiple of the group size, or another experts implementation: ValueError before
    anything changes; a sharded model switched to another implementation: ValueError."""
    model = tiny_model("qwen3_moe", num_experts=3)
    for group, members in _ep_groups():
        with pytest.raises(ValueError, match="num_experts=3 must be a positive multiple of the "
                           f"expert-parallel group size {len(members)}"):
            mh.replace_moe(model, ep_group=group)
        with pytest.raises(ValueError, match="needs experts_implementation='moeyard'"):
            mh.replace_moe(model, ep_group=group, experts_implementation="eager")
    assert not any(isinstance(m, mh.SparseMoeBlock) for m in model.modules())
    assert not md.expert_parameters(model)

    _, ep = _models("qwen3_moe", dist.group.WORLD)
    ep.set_experts_implementation("eager")
    with pytest.raises(ValueError, match="sharded over an expert-parallel group"):
        ep(_ids(rank))


CHECKS = [check_mixtral, check_qwen3_moe, check_qwen2_moe_shared_expert, check_deepseek_v3,
          check_gpt_oss_biases_transposed, check_save_pretrained_full_state_dict,
          check_capacity_is_sync_free, check_block_with_idle_ranks, check_refusals]


@pytest.fixture(scope="module")
def results():
    return run_checks(CHECKS, WORLD_SIZE)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_hf_ep(results, check):
    err = results[check.__name__]
    if err:
        pytest.fail(err, pytrace=False)
