"""Expert-parallelism benchmark: what moeyard.distributed's exchange sends and what it costs on
gloo ranks, against the same layer unsharded in one process.

The layer: TopKMoE (softmax top-k, not renormalized, balance loss), SwiGLU experts, fp32, training
mode, in two exchange modes: capacity (capacity factor 1.25, per source rank and expert: equal
splits, no host sync) and dropless (one host sync per forward, variable splits). For P ranks each
rank holds E / P experts and routes its own T tokens; the reference is the same layer (the same
weights: the full layer is built from one seed and sharded) unsharded in one process on all P * T
tokens.

Bytes: what one rank sends in one layer forward, counted at moeyard.distributed.all_to_all (the
dispatch rows, the combine rows coming back, the [E] count exchange; the rows a rank keeps for its
own experts included, as all_to_all_single copies them too); the backward sends the same again.
Against the dense counterpart "every token to every rank" (all-gather style dispatch and its
reduce back): T * d * P elements per direction, 2 * T * d * P * 4 bytes.

Time: P spawned processes, one thread each (torch.set_num_threads(1)), gloo, file rendezvous;
per iteration a barrier, then one forward (no_grad) or forward + backward (loss
out.pow(2).mean() + aux losses), the slowest rank's wall time; median of --reps after --warmup.
The reference: one process, one thread, same loss, on the P * T tokens. Speed-up = reference /
EP. More ranks than cores share the cores (the machine's core count is printed).

Checks first, in every rank: its EP output equals the unsharded layer's on its own tokens (both
modes: capacity is per source rank, so the single-device layer on the same T tokens drops the
same assignments); a WARNING row if not.

--device cuda: the ranks share the one GPU over gloo (NCCL refuses two ranks on one GPU), so the
exchange goes through host memory: it checks the CUDA path, it does not measure NCCL EP, which
needs several GPUs. Writes $OUT/bench_ep.json (OUT default "out").

    python benchmarks/bench_ep.py [--ranks 2,4] [--experts 8,16] [--quick] [--cpu-smoke]
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# d, I, k, T (tokens per rank), warm-up, repetitions
PRESETS = {"default": (512, 1024, 2, 2048, 2, 5), "quick": (128, 256, 2, 512, 1, 5),
           "cpu-smoke": (32, 16, 2, 64, 1, 1)}
MODES = {"capacity": 1.25, "dropless": None}
TOL = 1e-4
OUT = os.environ.get("OUT", "out")


def make_layer(d, I, E, k, cf, seed=0):
    """The full layer, the same on every rank and in the reference (seeded)."""
    import moeyard
    torch.manual_seed(seed)
    return moeyard.TopKMoE(d, I, E, k, capacity_factor=cf).train()


def tokens(rank, T, d, seed=0):
    return torch.randn(T, d, generator=torch.Generator().manual_seed(1000 * seed + rank))


def loss_of(layer, x):
    import moeyard
    return layer(x).float().pow(2).mean() + moeyard.collect_aux_losses(layer)


def timed(fn, device, warmup, reps, barrier=None):
    """Seconds of each of ``reps`` calls after ``warmup`` calls (a barrier before each)."""
    out = []
    for i in range(warmup + reps):
        if barrier:
            barrier()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def device_of(name):
    """"cpu", or "cuda": the one GPU every rank shares."""
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def passes(layer, x):
    """name -> call: one forward without grad, one forward + backward."""
    def fwd():
        with torch.no_grad():
            layer(x)

    def step():
        loss_of(layer, x).backward()
        layer.zero_grad(set_to_none=True)
    return {"fwd": fwd, "fwd+bwd": step}


class CountBytes:
    """Counts what this rank passes to and gets from moeyard.distributed.all_to_all while on."""

    def __init__(self, md):
        self.md, self.inner = md, md.all_to_all
        self.rows = self.counts = 0

    def __enter__(self):
        def counting(x, *args, **kwargs):
            nbytes = x.numel() * x.element_size()
            if x.is_floating_point():
                self.rows += nbytes
            else:
                self.counts += nbytes
            return self.inner(x, *args, **kwargs)
        self.md.all_to_all = counting
        return self

    def __exit__(self, *exc):
        self.md.all_to_all = self.inner


# ------------------------------------------------------------------------------ the ranks


def rank_main(rank, P, store, args, device_type, result_file):
    import moeyard.distributed as md
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=600))
    device = device_of(device_type)
    d, I, k, T, warmup, reps = args["shape"]
    rows = []
    try:
        for E in args["experts"]:
            for mode, cf in MODES.items():
                full = make_layer(d, I, E, k, cf).to(device)
                ep = md.shard_experts(copy.deepcopy(full))
                x = tokens(rank, T, d).to(device)
                with torch.no_grad():
                    err = (ep(x) - full(x)).abs().max().item()  # the EP layer is collective
                    with CountBytes(md) as sent:
                        ep(x)
                del full
                times = {name: timed(fn, device, warmup, reps, dist.barrier)
                         for name, fn in passes(ep, x).items()}
                stats = torch.tensor([err, sent.rows, sent.counts] + times["fwd"]
                                     + times["fwd+bwd"], dtype=torch.float64)
                every = [torch.empty_like(stats) for _ in range(P)]
                dist.all_gather(every, stats)
                every = torch.stack(every)  # [P, 3 + 2 reps]
                slowest = every[:, 3:].max(0).values
                rows.append(dict(E=E, mode=mode, P=P, max_err=every[:, 0].max().item(),
                                 sent_bytes_mean=every[:, 1].mean().item(),
                                 sent_bytes_max=every[:, 1].max().item(),
                                 count_bytes=every[:, 2].max().item(),
                                 ep_fwd_ms=1e3 * slowest[:reps].median().item(),
                                 ep_fwd_bwd_ms=1e3 * slowest[reps:].median().item()))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(result_file, "w") as fh:
            json.dump(rows, fh)


def run_ranks(P, args, device_type):
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.json")
        mp.spawn(rank_main, args=(P, os.path.join(tmp, "store"), args, device_type, result),
                 nprocs=P, join=True)
        with open(result) as fh:
            return json.load(fh)


def reference(P, args, device):
    """The unsharded layer in this process on the P * T tokens of the ranks:
    {(E, mode): (fwd ms, fwd+bwd ms)}."""
    d, I, k, T, warmup, reps = args["shape"]
    x = torch.cat([tokens(r, T, d) for r in range(P)]).to(device)
    out = {}
    for E in args["experts"]:
        for mode, cf in MODES.items():
            layer = make_layer(d, I, E, k, cf).to(device)
            out[E, mode] = [1e3 * statistics.median(timed(fn, device, warmup, reps))
                            for fn in passes(layer, x).values()]
    return out


# ----------------------------------------------------------------------------------- main


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4", help="comma list of rank counts P")
    ap.add_argument("--experts", default="8,16", help="comma list of expert counts E")
    ap.add_argument("--reps", type=int, help="timed repetitions (default: the preset's)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="small shape, fewer repetitions")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape, 1 repetition: plumbing")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import moeyard
    shape = list(PRESETS["cpu-smoke" if a.cpu_smoke else "quick" if a.quick else "default"])
    if a.reps:
        shape[-1] = a.reps
    d, I, k, T, warmup, reps = shape
    ranks = [int(p) for p in a.ranks.split(",") if p]
    args = dict(shape=shape, experts=[int(e) for e in a.experts.split(",") if e])
    device = device_of(a.device)
    cpu = cpu_model()
    meta = dict(torch=torch.__version__, moeyard=moeyard.__version__, device=a.device, cpu=cpu,
                cores=os.cpu_count(), date=time.strftime("%Y-%m-%d"), warmup=warmup, reps=reps,
                shape=dict(d=d, I=I, k=k, T_per_rank=T), dtype="float32", backend="gloo")
    print(f"TopKMoE d={d} I={I} k={k}, T={T} tokens per rank, fp32, {a.device}; gloo ranks, 1 "
          f"thread each, {os.cpu_count()} cores ({cpu}); torch {torch.__version__}; median of "
          f"{reps} after {warmup} warm-up", flush=True)
    if a.device == "cuda":
        print("--device cuda: the ranks share one GPU over gloo (NCCL refuses two ranks on one "
              "GPU): the exchange goes through host memory; NCCL multi-GPU EP is not measured")
    rows = []
    for P in ranks:
        if any(E % P for E in args["experts"]):
            sys.exit(f"every E in --experts must be a multiple of P = {P}")
        ref = reference(P, args, device)
        for r in run_ranks(P, args, a.device):
            dense = 2 * T * d * P * 4
            r.update(dense_bytes=dense, ratio=r["sent_bytes_mean"] / dense,
                     ref_fwd_ms=ref[r["E"], r["mode"]][0], ref_fwd_bwd_ms=ref[r["E"], r["mode"]][1],
                     warning=not r["max_err"] <= TOL)
            rows.append(r)
            print(f"  P={P} E={r['E']} {r['mode']}: done", flush=True)
    print("\n| E | mode | P | sent MB / rank / fwd (max) | count B | every token to every rank "
          "MB | EP / dense | 1-proc fwd ms (P*T tokens) | EP fwd ms | speed-up | 1-proc fwd+bwd "
          "ms | EP fwd+bwd ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['E']} | {r['mode']} | {r['P']} | {r['sent_bytes_mean'] / 1e6:.2f} "
              f"({r['sent_bytes_max'] / 1e6:.2f}) | {r['count_bytes']:.0f} | "
              f"{r['dense_bytes'] / 1e6:.2f} | {r['ratio']:.2f} | {r['ref_fwd_ms']:.1f} | "
              f"{r['ep_fwd_ms']:.1f} | {r['ref_fwd_ms'] / r['ep_fwd_ms']:.2f}x | "
              f"{r['ref_fwd_bwd_ms']:.1f} | {r['ep_fwd_bwd_ms']:.1f} | "
              f"{r['ref_fwd_bwd_ms'] / r['ep_fwd_bwd_ms']:.2f}x |")
    for r in rows:
        if r["warning"]:
            print(f"WARNING P={r['P']} E={r['E']} {r['mode']}: EP differs from the unsharded layer "
                  f"by {r['max_err']:.3g}")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "bench_ep.json"), "w") as fh:
        json.dump(dict(meta, rows=rows), fh, indent=1)
    return 1 if any(r["warning"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
