"""balanced_assignment (BASE layers): kernels vs reference.py (exact), the balance rule, optimality
against scipy's Hungarian solver, greedy oracles, the max_rounds completion, determinism, ties,
NaN/inf, bad input, opcheck, torch.compile and CUDA graphs."""
import math

import pytest
import torch

import moeyard
from moeyard import reference as ref
from conftest import DEVICES

linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment


def capacities(T, E):
    return ref.assignment_capacities(T, E)


def check_balanced(experts, T, E):
    """[T,1] int32 on the scores' device, ids in range, counts exactly the capacities, and the
    plan of it a permutation of the tokens."""
    assert experts.shape == (T, 1) and experts.dtype == torch.int32
    ex = experts.flatten().long().cpu()
    assert ((ex >= 0) & (ex < E)).all()
    assert torch.equal(torch.bincount(ex, minlength=E), capacities(T, E))
    p = moeyard.plan(experts, E)
    assert torch.equal(p.row_source.long().sort().values.cpu(), torch.arange(T))


def objective(scores, experts):
    s = scores.double().cpu()
    return s[torch.arange(s.shape[0]), experts.flatten().long().cpu()].sum().item()


def hungarian(scores, E):
    """The optimal balanced objective: Hungarian on the expert columns repeated capacity times."""
    T = scores.shape[0]
    cols = torch.repeat_interleave(torch.arange(E), capacities(T, E))
    s = scores.double().cpu()[:, cols].numpy()
    r, c = linear_sum_assignment(s, maximize=True)
    return s[r, c].sum()


def greedy_with_capacity(scores, E):
    """Tokens in order, each to its best expert that still has room (ties: lowest expert)."""
    T = scores.shape[0]
    room = capacities(T, E).clone()
    s = scores.double().cpu()
    out = torch.empty(T, 1, dtype=torch.int32)
    for t in range(T):
        v = torch.where(room > 0, s[t], -math.inf)
        e = int((v == v.max()).nonzero()[0])
        out[t] = e
        room[e] -= 1
    return out


SHAPES = [  # T, E: divisible, not, E = 1, T = 0, T < E, T = 1, E > 32 (several lanes' experts)
    (0, 4), (1, 5), (5, 1), (12, 4), (13, 4), (7, 10), (3, 8), (64, 8), (100, 7), (96, 33),
    (257, 64), (40, 40),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["randn", "int", "ties"])
@pytest.mark.parametrize("T,E", SHAPES)
def test_matches_reference_and_is_balanced(device, T, E, kind):
    if kind == "randn":
        scores = torch.randn(T, E)
    elif kind == "int":
        scores = torch.randint(-20, 20, (T, E)).float()
    else:  # few distinct values: many equal bids
        scores = torch.randint(0, 2, (T, E)).float()
    scores = scores.to(device)
    got = moeyard.balanced_assignment(scores)
    check_balanced(got, T, E)
    assert got.device == scores.device
    assert torch.equal(got.cpu(), ref.balanced_assignment(scores.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_match_reference(device, dtype):
    scores = torch.randn(50, 6, dtype=dtype, device=device)
    got = moeyard.balanced_assignment(scores)
    check_balanced(got, 50, 6)
    assert torch.equal(got.cpu(), ref.balanced_assignment(scores.cpu()))
    # fp16/bf16 scores are solved exactly as their fp32 values
    assert torch.equal(got, moeyard.balanced_assignment(scores.double()))


@pytest.mark.parametrize("T,E", [(12, 3), (20, 4), (23, 5), (30, 6), (9, 12), (48, 8)])
def test_integer_scores_are_exactly_optimal(T, E):
    for _ in range(5):
        scores = torch.randint(-50, 50, (T, E)).float() + 1000.0  # on the grid: exact
        got = moeyard.balanced_assignment(scores)
        check_balanced(got, T, E)
        assert objective(scores, got) == hungarian(scores, E)


@pytest.mark.parametrize("T,E", [(12, 3), (21, 4), (40, 8), (17, 17), (64, 4)])
def test_real_scores_within_grid_bound_and_beat_greedy(T, E):
    for _ in range(5):
        scores = torch.randn(T, E) * 3
        got = moeyard.balanced_assignment(scores)
        check_balanced(got, T, E)
        opt = hungarian(scores, E)
        span = (scores.max() - scores.min()).item()
        q = 2.0 ** (math.frexp(span)[1] - 24)  # >= the grid step
        assert objective(scores, got) >= opt - T * q
        assert objective(scores, got) <= opt + 1e-9
        assert objective(scores, got) >= objective(scores, greedy_with_capacity(scores, E)) - 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_max_rounds_zero_is_greedy_with_capacity(device):
    for T, E in [(30, 4), (31, 5), (6, 9)]:
        scores = torch.randn(T, E, device=device)
        got = moeyard.balanced_assignment(scores, max_rounds=0)
        check_balanced(got, T, E)
        assert torch.equal(got.cpu(), greedy_with_capacity(scores.float().cpu(), E))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_rounds", [1, 2, 5, 17])
def test_round_cap_completion_is_balanced_and_matches_reference(device, max_rounds):
    scores = torch.randint(0, 3, (120, 8)).float().to(device)  # needs many rounds
    got = moeyard.balanced_assignment(scores, max_rounds)
    check_balanced(got, 120, 8)
    assert torch.equal(got.cpu(), ref.balanced_assignment(scores.cpu(), max_rounds))
    assert torch.equal(got, moeyard.balanced_assignment(scores, max_rounds))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    scores = torch.randn(500, 16, device=device)
    first = moeyard.balanced_assignment(scores)
    for _ in range(3):
        assert torch.equal(moeyard.balanced_assignment(scores), first)
    check_balanced(first, 500, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_equal_scores_go_round_robin(device):
    """Equal scores: token t to expert t mod min(T, E) (each token bids for the first of equal
    experts from t mod E, cyclically: one round), which is exactly balanced."""
    for T, E in [(12, 4), (14, 4), (3, 5), (40, 40)]:
        want = (torch.arange(T) % min(T, E)).int().view(T, 1)
        for value in (0.0, 2.5, -1e30):
            scores = torch.full((T, E), value, device=device)
            got = moeyard.balanced_assignment(scores)
            assert torch.equal(got.cpu(), want)
            assert torch.equal(ref.balanced_assignment(scores.cpu()), want)  # the auction's result


def _scores_of_kind(kind, T, E):
    """[T, E] scores: "constant", "nan" (all NaN), "nonfinite" (NaN and +-inf: all count as
    equal) or "randn"."""
    if kind == "constant":
        return torch.full((T, E), 2.5)
    if kind == "nan":
        return torch.full((T, E), float("nan"))
    if kind == "nonfinite":
        values = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return values[torch.randint(0, 3, (T, E))]
    return torch.randn(T, E)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_rounds", [0, 1, ref.ASSIGNMENT_MAX_ROUNDS])
@pytest.mark.parametrize("kind", ["constant", "nan", "nonfinite", "randn"])
def test_one_rule_for_equal_scores_and_max_rounds(device, kind, max_rounds):
    """Kernels and reference agree, also where two rules meet: all-equal scores give
    t -> t mod min(T, E) because that is the auction's first round, so with max_rounds = 0 (no
    round) they get greedy-with-capacity in token order like any scores: expert 0 takes the first
    tokens up to its capacity, then expert 1, ..."""
    for T, E in [(12, 4), (14, 4), (3, 5), (40, 40)]:
        scores = _scores_of_kind(kind, T, E)
        want = ref.balanced_assignment(scores, max_rounds)
        got = moeyard.balanced_assignment(scores.to(device), max_rounds)
        check_balanced(got, T, E)
        assert torch.equal(got.cpu(), want)
        if kind == "randn":
            continue
        if max_rounds == 0:
            rule = torch.repeat_interleave(torch.arange(E), capacities(T, E))
        else:
            rule = torch.arange(T) % min(T, E)
        assert torch.equal(want, rule.int().view(T, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_equal_rows(device):
    """All tokens alike: every balanced assignment is optimal; the result is one of them, the
    reference's."""
    T, E = 12, 3
    scores = torch.tensor([3.0, 2.0, 1.0], device=device).expand(T, E).contiguous()
    got = moeyard.balanced_assignment(scores)
    check_balanced(got, T, E)
    assert torch.equal(got.cpu(), ref.balanced_assignment(scores.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_scores_count_as_the_finite_minimum(device):
    torch.manual_seed(3)
    scores = torch.randn(40, 5)
    bad = torch.rand(40, 5) < 0.2
    values = torch.tensor([float("nan"), float("inf"), -float("inf")])
    dirty = torch.where(bad, values[torch.randint(0, 3, (40, 5))], scores)
    clean = torch.where(bad, scores[~bad].min(), scores)
    got = moeyard.balanced_assignment(dirty.to(device))
    check_balanced(got, 40, 5)
    assert torch.equal(got.cpu(), moeyard.balanced_assignment(clean))
    assert torch.equal(got.cpu(), ref.balanced_assignment(dirty))
    # nothing finite: all scores equal
    allbad = torch.full((10, 3), float("nan"), device=device)
    allbad[0, 0] = float("inf")
    assert torch.equal(moeyard.balanced_assignment(allbad).cpu(),
                       moeyard.balanced_assignment(torch.zeros(10, 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_ranges(device):
    """fp64 scores whose range overflows fp64 (halved grid) and tiny ranges stay exact."""
    s = torch.randint(-3, 4, (24, 4)).double()
    for scaled in (s * 2.0**1022, s * 2.0**-1000, s + 2.0**50):  # exact scalings of s
        got = moeyard.balanced_assignment(scaled.to(device))
        check_balanced(got, 24, 4)
        assert torch.equal(got.cpu(), moeyard.balanced_assignment(s))
        assert torch.equal(got.cpu(), ref.balanced_assignment(scaled))


def test_grid_matches_reference_definition():
    scores = torch.randn(30, 7) * 100 + 5
    Q, qmax = ref.assignment_grid(scores)
    assert Q.min() == 0 and Q.max() == qmax and qmax <= 2**24
    span = (scores.double().max() - scores.double().min()).item()
    assert qmax > 2**23  # the grid uses (almost) all 24 bits of the range
    q = span / qmax
    torch.testing.assert_close(Q.double() * q + scores.double().min(), scores.double(),
                               atol=q, rtol=0)


def test_not_differentiable_and_opcheck():
    scores = torch.randn(20, 4, requires_grad=True)
    out = moeyard.balanced_assignment(scores)
    assert not out.requires_grad
    torch.library.opcheck(torch.ops.moeyard.balanced_assignment.default, (scores,))
    torch.library.opcheck(torch.ops.moeyard.balanced_assignment.default, (scores.detach(), 3))
    torch.library.opcheck(torch.ops.moeyard.balanced_assignment.default,
                          (torch.randn(0, 3, dtype=torch.float64),))


@pytest.mark.gpu
def test_opcheck_cuda():
    scores = torch.randn(40, 6, device="cuda")
    torch.library.opcheck(torch.ops.moeyard.balanced_assignment.default, (scores,))


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def fn(scores):
        experts = moeyard.balanced_assignment(scores)
        return experts, moeyard.plan(experts, scores.shape[1]).counts

    scores = torch.randn(37, 5)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(scores)
    want = fn(scores)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_cuda_large_matches_cpu_and_cuda_graph():
    torch.manual_seed(0)
    # (3072, 3072): the most experts with prices in shared memory; (3100, 3100): global memory
    for T, E in [(4096, 64), (3000, 7), (2048, 300), (600, 5000), (3072, 3072), (3100, 3100)]:
        scores = torch.randn(T, E) if E > 1000 else torch.randn(T, E) @ torch.randn(E, E) / E**0.5
        got = moeyard.balanced_assignment(scores.cuda())
        check_balanced(got, T, E)
        assert torch.equal(got.cpu(), moeyard.balanced_assignment(scores))
    scores = torch.randn(1000, 16, device="cuda")
    moeyard.balanced_assignment(scores)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moeyard.balanced_assignment(scores)
    scores.copy_(torch.randn(1000, 16, device="cuda"))
    graph.replay()
    assert torch.equal(out, moeyard.balanced_assignment(scores))


@pytest.mark.parametrize("fn,msg", [
    (lambda: moeyard.balanced_assignment(torch.randn(4)), "2 dimensions"),
    (lambda: moeyard.balanced_assignment(torch.randn(2, 3, 4)), "2 dimensions"),
    (lambda: moeyard.balanced_assignment(torch.ones(4, 2, dtype=torch.int32)), "floating"),
    (lambda: moeyard.balanced_assignment(torch.randn(4, 0)), "at least one expert"),
    (lambda: moeyard.balanced_assignment(torch.randn(4, 2), -1), "max_rounds"),
])
def test_bad_input(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()
