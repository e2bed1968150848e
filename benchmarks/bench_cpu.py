"""CPU benchmark of the expert-compute backends: which one ``backend="auto"`` should take on the
CPU (the CPU rows of the table in csrc/experts/backend.cpp).

A TopKMoE layer (Qwen3-MoE routing: softmax, top-k, renormalized, dropless, balance loss) on one
thread, d 256, I 128, E 32, k 4, T 2048 (2 x 1024), in fp32, bf16 and fp16, with its experts on
each backend ("moeyard": moeyard's own grouped GEMM; "grouped_mm": torch's grouped GEMM around
moeyard's gather, activation and combine) against the same layer written in plain PyTorch on
torch._grouped_mm (benchmarks/bench_layers.py's "torch" side: routing in torch ops, expert-sorted
rows, two grouped products, index_add combine in fp32), on the same weights and input.

Each implementation is checked against the plain one first (loss and gradients of x, the router
and the expert weights, relative Frobenius error). Timing: wall clock of single calls, the
implementations interleaved call by call (so a machine that slows down slows them all), median
of the repetitions after warm-up; fwd under no_grad, fwd+bwd with loss out.float().pow(2).mean()
+ the aux losses. Prints a table with each backend's speed relative to the plain pipeline
(> 1: faster) and writes $OUT/bench_cpu.json (OUT default "out").

    python benchmarks/bench_cpu.py [--dtypes float32,bfloat16] [--reps 9] [--smoke]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_layers as bl  # noqa: E402  (the layer and its plain-PyTorch version live there)

SHAPE = (256, 128, 32, 4, 2048)  # d, I, E, k, T
SMOKE_SHAPE = (32, 16, 8, 2, 64)
SEQ = 1024
BACKENDS = ("moeyard", "grouped_mm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
# The check's gradients are of LOSS_SCALE * loss: at N(0, 0.02) weights the weight gradients of the
# plain loss are ~1e-7, fp16 subnormals (relative errors are scale-free; fp32 and bf16 unaffected).
LOSS_SCALE = 2.0 ** 12


def make(shape, dtype):
    d, f, E, k, T = shape
    torch.manual_seed(0)
    layer = bl.make_layer("topk", d, f, E, k).to(dtype=dtype).train()
    x = torch.randn(max(T // SEQ, 1), min(SEQ, T), d, dtype=dtype).requires_grad_(True)
    return layer, x


def impls(layer):
    """name -> loss(layer, x): each backend of the moeyard layer, and the plain pipeline."""
    def on(backend):
        def loss(layer, x):
            layer.experts.backend = backend
            return bl.moeyard_loss(layer, x)
        return loss
    return {**{b: on(b) for b in BACKENDS}, "plain": bl.torch_loss("topk")}


def check(layer, x, fns, tol):
    params = [x, layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj]
    want_loss = fns["plain"](layer, x)
    want = torch.autograd.grad(LOSS_SCALE * want_loss, params)
    errs = {}
    for name in BACKENDS:
        loss = fns[name](layer, x)
        got = torch.autograd.grad(LOSS_SCALE * loss, params)
        errs[name] = max([bl.rel_err(loss, want_loss)] + [bl.rel_err(a, b) for a, b in zip(got, want)])
    bad = {n: e for n, e in errs.items() if not e <= tol}
    return errs, bad


def time_interleaved(calls, warmup, reps):
    """name -> median seconds of single calls, the calls of all names interleaved."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {n: [] for n in calls}
    for _ in range(reps):
        for n, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def run(shape, dtype, warmup, reps):
    layer, x = make(shape, dtype)
    fns = impls(layer)
    errs, bad = check(layer, x, fns, TOL[dtype])

    def fwd(fn):
        def call():
            with torch.no_grad():
                fn(layer, x)
        return call

    def step(fn):
        def call():
            fn(layer, x).backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None
        return call

    t_fwd = time_interleaved({n: fwd(fn) for n, fn in fns.items()}, warmup, reps)
    t_step = time_interleaved({n: step(fn) for n, fn in fns.items()}, warmup, reps)
    layer.experts.backend = "auto"
    return dict(dtype=str(dtype).removeprefix("torch."), errors=errs, warning=bool(bad),
                fwd_ms={n: 1e3 * t for n, t in t_fwd.items()},
                fwd_bwd_ms={n: 1e3 * t for n, t in t_step.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 1 repetition: plumbing only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import moeyard
    shape, warmup, reps = (SMOKE_SHAPE, 1, 1) if args.smoke else (SHAPE, 2, args.reps)
    meta = dict(torch=torch.__version__, moeyard=moeyard.__version__, threads=args.threads,
                shape=dict(zip("d I E k T".split(), shape)), reps=reps,
                date=time.strftime("%Y-%m-%d"), auto=moeyard.experts_backend_table()["devices"][0])
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; d, I, E, k, T = {shape}")
    rows = [run(shape, DTYPES[d], warmup, reps) for d in args.dtypes.split(",") if d]
    print("\n| dtype | mode | plain ms | moeyard ms | grouped_mm ms | moeyard vs plain | "
          "grouped_mm vs plain | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode in ("fwd_ms", "fwd_bwd_ms"):
            t = r[mode]
            print(f"| {r['dtype']} | {mode[:-3].replace('_', '+')} | {t['plain']:.1f} | "
                  f"{t['moeyard']:.1f} | {t['grouped_mm']:.1f} | "
                  f"{t['plain'] / t['moeyard']:.2f}x | {t['plain'] / t['grouped_mm']:.2f}x | "
                  f"{meta['auto']['auto'][r['dtype']]} |")
        if r["warning"]:
            print(f"WARNING {r['dtype']}: a backend differs from the plain pipeline: {r['errors']}")
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_cpu.json"), "w") as fh:
        json.dump(dict(meta, rows=rows), fh, indent=1)
    return 1 if any(r["warning"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
