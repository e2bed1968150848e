"""Multi-process harness for the expert-parallel tests: real gloo process groups on CPU.

:func:`run_checks` starts ``world_size`` spawned processes once (the spawn, not the collectives,
is what costs: ~2 s per process on the 2-core CI machine) and runs a list of check functions in
all of them, in order; each check is ``check(rank, world_size, *args)`` and asserts (``args``
e.g. the device: on a GPU machine the ranks share the one GPU, as NCCL cannot, over gloo). Every process uses
one thread, a file store rendezvous and a 60 s collective timeout, so a hang fails the check
instead of blocking CI; the parent gives up (and kills the ranks) when no result has come for
``timeout`` seconds. After each
check the ranks agree (one all-gather) on whether it passed everywhere; after a failure the
remaining checks are reported as not run, since the ranks' collectives may no longer line up.
"""
from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _worker(rank, world_size, store, checks, args, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for i, check in enumerate(checks):
            try:
                check(rank, world_size, *args)
                err = None
            except BaseException:  # noqa: BLE001 - reported to the parent, per check
                err = traceback.format_exc()
            results.put((rank, check.__name__, err))
            ok = torch.tensor([err is None], dtype=torch.int32)
            every = [torch.empty_like(ok) for _ in range(world_size)]
            dist.all_gather(every, ok)
            if not all(bool(t) for t in every):
                for rest in checks[i + 1:]:
                    results.put((rank, rest.__name__, "not run: an earlier check failed"))
                break
    finally:
        dist.destroy_process_group()


def run_checks(checks, world_size: int, *args, timeout: float = 300) -> dict[str, str | None]:
    """Run ``check(rank, world_size, *args)`` for each of ``checks`` on ``world_size`` gloo ranks;
    ``{check name: None if it passed on every rank, else the failing ranks' tracebacks}``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store, checks, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out: dict[str, list[str]] = {c.__name__: [] for c in checks}
        reports = dict.fromkeys(out, 0)
        try:
            while sum(reports.values()) < world_size * len(checks):
                rank, name, err = results.get(timeout=timeout)
                reports[name] += 1
                if err is not None:
                    out[name].append(f"rank {rank}:\n{err}")
        except queue.Empty:
            for name, n in reports.items():
                if n < world_size:
                    out[name].append(f"{world_size - n} rank(s) gave no result within {timeout} "
                                     "s (hung or died)")
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return {name: "\n".join(errs) or None for name, errs in out.items()}
