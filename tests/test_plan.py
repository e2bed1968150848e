"""plan and expert_choice: kernels vs reference.py (exact), invariants, oracles, bad input."""
import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES, random_experts, zipf_experts


def _check_plan_invariants(p, experts, E, capacity):
    T, k = experts.shape
    rs, tr = p.row_source.long().cpu(), p.token_row.long().cpu()
    R = T * k if capacity is None else E * capacity
    assert rs.shape == (R,) and tr.shape == (T, k) and p.offsets.shape == (E + 1,)
    # row_source and token_row are inverse maps on the kept assignments
    used = rs >= 0
    assert torch.equal(tr.flatten()[rs[used]], torch.arange(R)[used])
    kept = tr.flatten() >= 0
    assert torch.equal(rs[tr.flatten()[kept]], torch.arange(T * k)[kept])
    ex = experts.long().cpu()
    assert torch.equal(p.counts.long().cpu(), torch.bincount(ex[ex >= 0], minlength=E))
    kept_per_expert = p.offsets.long().cpu().diff()
    assert int(kept.sum()) == int(p.offsets[-1])
    if capacity is not None:
        assert (kept_per_expert <= capacity).all()
        # rows of expert e hold tokens routed to e
        rows = torch.arange(R)[used]
        assert torch.equal(ex.flatten()[rs[used]], rows // capacity)


def _assert_plans_equal(a, b):
    for x, y in zip(a[:4], b[:4]):
        assert x.dtype == torch.int32
        assert torch.equal(x.cpu(), y.cpu())


CASES = [  # T, k, E, capacity, p_none
    (0, 2, 4, None, 0.0), (0, 2, 4, 3, 0.0), (1, 1, 1, None, 0.0), (7, 2, 3, 1, 0.0),
    (300, 1, 8, None, 0.0), (300, 2, 8, 40, 0.0), (300, 4, 64, 5, 0.3), (256, 8, 64, None, 0.2),
    (100, 4, 4, 0, 0.0), (100, 3, 16, 1000, 0.1), (513, 8, 128, 33, 0.0),
    (300, 2, 4000, None, 0.1), (300, 2, 4000, 3, 0.0),  # E too large for shared-memory counters
    (3000, 8, 64, 100, 0.0),  # many warps' chunks
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("T,k,E,capacity,p_none", CASES)
def test_plan_matches_reference(device, policy, T, k, E, capacity, p_none):
    experts = random_experts(T, k, E, device, p_none)
    weights = torch.rand(T, k, device=device)
    p = moeyard.plan(experts, E, capacity, policy, weights)
    _assert_plans_equal(p, ref.plan(experts, E, capacity, policy, weights))
    _check_plan_invariants(p, experts, E, capacity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [None, 3, 50])
def test_plan_zipf_and_ties(device, capacity):
    experts = zipf_experts(2000, 4, 32, device)
    weights = torch.randint(0, 3, (2000, 4), device=device).float()  # many tied scores
    for policy in ["position", "score"]:
        p = moeyard.plan(experts, 32, capacity, policy, weights)
        _assert_plans_equal(p, ref.plan(experts, 32, capacity, policy, weights))
        _check_plan_invariants(p, experts, 32, capacity)


@pytest.mark.parametrize("device", DEVICES)
def test_position_priority_keeps_earliest(device):
    """Switch oracle: every token on expert 0, capacity C -> exactly the first C tokens kept."""
    T, C = 50, 7
    experts = torch.zeros(T, 1, dtype=torch.int32, device=device)
    p = moeyard.plan(experts, 4, C)
    assert p.token_row[:C, 0].tolist() == list(range(C))
    assert (p.token_row[C:] == -1).all()
    assert p.counts.tolist() == [T, 0, 0, 0] and p.offsets.tolist() == [0, C, C, C, C]


@pytest.mark.parametrize("device", DEVICES)
def test_first_choices_before_second_choices(device):
    """GShard: all first choices get slots before any second choice."""
    experts = torch.tensor([[1, 0], [0, 1], [2, 0], [0, 2]], dtype=torch.int32, device=device)
    p = moeyard.plan(experts, 3, capacity=2)
    kept = p.token_row >= 0
    # expert 0's two slots go to the first choices of tokens 1 and 3, so the second choices of
    # tokens 0 and 2 are dropped although token 0 comes first
    assert kept.tolist() == [[True, False], [True, True], [True, False], [True, True]]


@pytest.mark.parametrize("device", DEVICES)
def test_score_priority_keeps_most_confident(device):
    experts = torch.zeros(6, 1, dtype=torch.int32, device=device)
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.9], [0.2], [0.7]], device=device)
    p = moeyard.plan(experts, 2, capacity=3, drop_policy="score", weights=weights)
    assert (p.token_row[:, 0] >= 0).tolist() == [False, True, False, True, False, True]
    assert p.row_source[:3].tolist() == [1, 3, 5]  # rows in priority order, ties to earlier


def test_plan_opcheck():
    experts = random_experts(40, 2, 8, "cpu", 0.1)
    w = torch.rand(40, 2)
    for args in [(experts, 8, None, "position", None), (experts, 8, 6, "score", w),
                 (experts.long(), 8, None, "score", w), (experts.long(), 8, 6, "position", None)]:
        torch.library.opcheck(torch.ops.moeyard.plan.default, args)


@pytest.mark.gpu
def test_plan_opcheck_cuda():
    experts = random_experts(40, 2, 8, "cuda", 0.1)
    torch.library.opcheck(torch.ops.moeyard.plan.default, (experts, 8, 6, "position", None))


PLAN_BAD = [
    (lambda: moeyard.plan(torch.tensor([[0, 4]], dtype=torch.int32), 4), "is not an expert id"),
    (lambda: moeyard.plan(torch.tensor([[0, -2]], dtype=torch.int32), 4), "is not an expert id"),
    (lambda: moeyard.plan(torch.zeros(3, 2), 4), "int32 or int64"),
    (lambda: moeyard.plan(torch.zeros(3, 2, dtype=torch.int16), 4), "int32 or int64"),
    (lambda: moeyard.plan(torch.zeros(3, dtype=torch.int32), 4), "2 dimensions"),
    (lambda: moeyard.plan(torch.zeros(3, 2, dtype=torch.int32), 0), "num_experts"),
    (lambda: moeyard.plan(torch.zeros(3, 2, dtype=torch.int32), 4, -1), "capacity"),
    (lambda: moeyard.plan(torch.zeros(3, 2, dtype=torch.int32), 4, 2, "random"), "drop_policy"),
    (lambda: moeyard.plan(torch.zeros(3, 2, dtype=torch.int32), 4, 2, "score"), "weights"),
    (lambda: moeyard.plan(torch.zeros(3, 2, dtype=torch.int32), 4, 2, "score", torch.rand(3, 3)),
     "weights"),
]


@pytest.mark.parametrize("fn,msg", PLAN_BAD)
def test_plan_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("capacity", [None, 0, 3, 50])
def test_plan_int64_ids_give_the_int32_plan(device, policy, capacity):
    """Hugging Face routers return int64 ids: the kernels read them as they are and give exactly
    the plan of the same ids in int32 (-1 entries included), in int32."""
    experts = random_experts(300, 4, 16, device, p_none=0.2)
    weights = torch.randint(0, 4, (300, 4), device=device).float()  # tied scores too
    want = moeyard.plan(experts, 16, capacity, policy, weights)
    got = moeyard.plan(experts.long(), 16, capacity, policy, weights)
    _assert_plans_equal(got, want)
    _assert_plans_equal(got, ref.plan(experts.long(), 16, capacity, policy, weights))


def test_plan_meta_takes_int32_and_int64_ids_only():
    """The fake kernel (shape propagation, torch.compile) accepts what the kernels accept."""
    for dtype in (torch.int32, torch.int64):
        p = moeyard.plan(torch.zeros(5, 2, dtype=dtype, device="meta"), 4, 3)
        assert p.token_row.dtype == torch.int32 and p.row_source.shape == (12,)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        moeyard.plan(torch.zeros(5, 2, device="meta"), 4)


@pytest.mark.parametrize("bad", [16, -2, 2**31, 2**32 - 1, 2**32 + 1, -2**40])
def test_plan_bad_int64_ids(bad):
    """int64 ids are checked as int64: values that an int32 conversion would wrap into a valid id
    (2^32 - 1 -> -1, 2^32 + 1 -> 1) are refused like any other."""
    experts = torch.zeros(3, 2, dtype=torch.int64)
    experts[1, 1] = bad
    with pytest.raises(RuntimeError, match=rf"experts\[1, 1\] = {bad} is not an expert id"):
        moeyard.plan(experts, 16)


# ------------------------------------------------------------------------------ expert choice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,C", [(0, 4, 2), (1, 1, 1), (20, 4, 0), (20, 4, 5), (20, 4, 20),
                                   (20, 4, 27), (300, 16, 40)])
def test_expert_choice_matches_reference(device, T, E, C):
    scores = torch.softmax(torch.randn(T, E, device=device), -1)
    got = moeyard.expert_choice(scores, C)
    want = ref.expert_choice(scores, C)
    w, e, p = got
    assert torch.equal(w.cpu(), want[0].cpu()) and torch.equal(e.cpu(), want[1].cpu())
    _assert_plans_equal(p, want[2:])
    assert (p.counts == min(C, T)).all()
    _check_plan_invariants(p, e, E, C)


@pytest.mark.parametrize("device", DEVICES)
def test_expert_choice_ties_and_nan(device):
    scores = torch.tensor([[0.5, float("nan")], [0.5, 0.1], [0.2, 0.1], [0.5, 0.3]], device=device)
    w, e, p = moeyard.expert_choice(scores, 2)
    # expert 0 takes tokens 0 and 1 (ties to the earlier token); expert 1 takes 3 and 1 (NaN last)
    assert p.row_source.tolist() == [0, 2, 6, 3]
    assert e.tolist() == [[0, -1], [0, 1], [-1, -1], [1, -1]]


def test_expert_choice_gradcheck_and_opcheck():
    scores = torch.rand(10, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: moeyard.expert_choice(s, 3)[0], (scores,))
    torch.library.opcheck(torch.ops.moeyard.expert_choice.default, (scores, 3))


@pytest.mark.parametrize("fn,msg", [
    (lambda: moeyard.expert_choice(torch.rand(4, 2), -1), "capacity"),
    (lambda: moeyard.expert_choice(torch.rand(4), 1), "2 dimensions"),
    (lambda: moeyard.expert_choice(torch.ones(4, 2, dtype=torch.int32), 1), "floating"),
])
def test_expert_choice_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()
