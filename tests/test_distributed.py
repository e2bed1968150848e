"""Expert parallelism (moeyard.distributed) on real gloo process groups (CPU), world sizes 2 and 4.

Every check runs in all ranks of one spawn per world size (tests/ranks.py) and compares each rank
with a single-process reference computed inside the rank from the same seeds: the full layer is
built identically on every rank, then sharded."""
import copy

import pytest
import torch
import torch.distributed as dist

import moeyard
import moeyard.distributed as md
from ranks import run_checks

pytestmark = pytest.mark.distributed

E, D, I = 8, 16, 24


def _inputs(rank, T, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(T, D, generator=g)


def check_dropless_forward(rank, ws):
    for k in (1, 2):
        torch.manual_seed(0)
        full = moeyard.TopKMoE(D, I, E, k=k)
        ep = md.shard_experts(copy.deepcopy(full))
        x = _inputs(rank, 0 if rank == 1 else 9)
        torch.testing.assert_close(ep(x), full(x), rtol=1e-5, atol=1e-6)


CHECKS = [check_dropless_forward]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ws: f"ws{ws}")
def results(request):
    return run_checks(CHECKS, request.param)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_ep(results, check):
    err = results[check.__name__]
    if err:
        pytest.fail(err, pytrace=False)
