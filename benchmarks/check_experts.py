"""Expert-compute correctness on the device at hand, the first check of benchmarks/gpu_check.py:
every backend (moeyard, grouped_mm, auto) of grouped_mm and expert_ffn against float64 references
(python/moeyard/reference.py on the same inputs cast to float64), on fresh random inputs, in bf16,
fp16 and fp32, forward and backward, aligned and odd shapes, dropless and capacity plans, empty
experts and -1 slots, every activation of the table.

Each case also checks, on CUDA:
  every element written  the caching allocator's free memory is filled with NaN before each case
                         (poison), so an output element no kernel wrote shows up as NaN;
  NaN never passes       NaN in the x rows of tokens that no expert keeps reaches no output and no
                         gradient, and those tokens' outputs are exactly zero;
  refusals               where backend="grouped_mm" cannot serve the inputs (odd widths, float32 /
                         float16 dropless plans on CUDA, where torch's grouped GEMM would sync)
                         it raises, and "auto" computes on moeyard's kernel instead.
Errors are relative Frobenius norms ||got - want|| / ||want|| per tensor, against TOL[dtype].

Writes $OUT/check_experts.json (OUT default "out"), prints one line per failure and a summary;
exit status 1 if anything failed.

    python benchmarks/check_experts.py [--device cuda] [--cpu-smoke]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import moeyard
from moeyard import reference as ref

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("moeyard", "grouped_mm", "auto")

# expert_ffn cases: name, T, k, E, H, I, capacity, p_none, zipf, activation, layout, bias
FFN_CASES = [
    ("aligned-swiglu", 384, 4, 16, 64, 32, None, 0.1, False, "swiglu", "linear", False),
    ("aligned-oss-bias", 256, 2, 8, 64, 48, None, 0.0, False, "swiglu_oss", "matmul", True),
    ("zipf-empty-experts", 200, 4, 64, 128, 64, None, 0.0, True, "swiglu", "linear", False),
    ("capacity-gelu-bias", 300, 2, 8, 64, 32, 60, 0.1, False, "gelu", "linear", True),
    ("capacity-tanh", 128, 2, 4, 32, 16, 48, 0.0, False, "gelu_tanh", "matmul", False),
    ("relu-none-slots", 160, 3, 6, 48, 40, None, 0.3, False, "relu", "linear", False),
    ("identity", 64, 1, 4, 32, 16, None, 0.0, False, "none", "linear", False),
    ("odd-widths", 97, 2, 5, 17, 5, None, 0.1, False, "swiglu", "linear", True),
    ("odd-capacity", 50, 2, 3, 13, 7, 20, 0.0, False, "gelu", "matmul", False),
    ("T0", 0, 2, 4, 32, 16, None, 0.0, False, "swiglu", "linear", False),
]
# Every other activation of the table on one small aligned case each (E = 4: the float64
# reference loops over experts), alternating dropless / capacity, layout and bias.
FFN_CASES += [
    (f"act-{act}", 96, 2, 4, 32, 16, (None, 40)[i % 2], 0.1, False, act,
     ("linear", "matmul")[i // 2 % 2], i % 3 == 0)
    for i, act in enumerate(a for a in ref.ACTIVATIONS if a not in {c[9] for c in FFN_CASES})
]
SMOKE_FFN = ("aligned-swiglu", "aligned-oss-bias", "capacity-gelu-bias", "odd-widths", "T0",
             "act-geglu", "act-relu2")

# grouped_mm cases: name, R (rows), E, K, N, mode ("plain" | "gathered" | "capacity"), b order
GMM_CASES = [
    ("plain-kn", 400, 8, 64, 48, "plain", "kn"),
    ("gathered-nk", 300, 16, 64, 96, "gathered", "nk"),
    ("capacity-nk", 240, 6, 32, 64, "capacity", "nk"),
    ("odd-gathered", 120, 4, 13, 7, "gathered", "kn"),
]


def poison(device):
    """Fill the caching allocator's free memory with NaN (both its pools: blocks of at most 1 MiB
    are carved from 2 MiB segments, larger ones from large segments)."""
    if device != "cuda":
        return
    torch.cuda.synchronize()
    small = [torch.full((1 << 17,), float("nan"), device=device) for _ in range(64)]  # 512 KiB
    large = torch.full((1 << 28,), float("nan"), device=device)  # 1 GiB
    del small, large
    torch.cuda.synchronize()


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-300)).item()


class Report:
    def __init__(self):
        self.rows, self.failures = [], 0

    def refusal(self, kind, case, dtype, backend, run):
        """backend="grouped_mm" where it cannot serve the inputs: run() must refuse, saying so."""
        try:
            run()
            self.add(kind, case, dtype, backend, False, error="not refused")
        except RuntimeError as ex:
            self.add(kind, case, dtype, backend, "cannot compute" in str(ex), refused=True)

    def add(self, kind, case, dtype, backend, ok, **info):
        self.rows.append(dict(kind=kind, case=case, dtype=str(dtype).removeprefix("torch."),
                              backend=backend, ok=bool(ok), **info))
        if not ok:
            self.failures += 1
            print(f"FAIL {kind} {case} {dtype} {backend}: {info}", flush=True)


def routing(T, k, E, p_none, zipf, device):
    if zipf:
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.3
        experts = torch.multinomial(p.expand(T, E), k, replacement=False)
    else:
        experts = torch.rand(T, E).argsort(dim=1)[:, :k]
    experts = experts.to(torch.int32).masked_fill(torch.rand(T, k) < p_none, -1)
    return experts.to(device)


def check_ffn(rep, device, dtype, case):
    name, T, k, E, H, I, cap, p_none, zipf, act, layout, bias = case
    N1 = 2 * I if ref.is_gated(act) else I
    p = moeyard.plan(routing(T, k, E, p_none, zipf, device), E, cap)
    dev64 = dict(device=device, dtype=torch.float64)
    x = torch.randn(T, H, **dev64)
    dead = (p.token_row < 0).all(1)
    x[dead] = float("nan")  # tokens no expert keeps: must reach nothing
    w = torch.rand(T, k, device=device)
    shapes = ((E, N1, H), (E, H, I)) if layout == "linear" else ((E, H, N1), (E, I, H))
    gu = torch.randn(*shapes[0], **dev64) / math.sqrt(H)
    dn = torch.randn(*shapes[1], **dev64) / math.sqrt(I)
    b1 = 0.3 * torch.randn(E, N1, **dev64) if bias else None
    b2 = 0.3 * torch.randn(E, H, **dev64) if bias else None
    inputs = [t for t in (x, w, gu, dn, b1, b2) if t is not None]
    # inputs in dtype; the reference takes them exactly, cast back to float64
    low = [t.to(dtype) if t.dtype == torch.float64 else t for t in inputs]
    grad = torch.randn(T, H, device=device)

    def reference():
        leaves = [t.detach().double().requires_grad_() for t in low]
        xs, ws, gus, dns = leaves[:4]
        b1s, b2s = (leaves[4], leaves[5]) if bias else (None, None)
        w1, w2 = (gus.transpose(1, 2), dns.transpose(1, 2)) if layout == "linear" else (gus, dns)
        out = ref.expert_ffn(xs.nan_to_num(), p.row_source, p.token_row, p.offsets, cap, ws, w1,
                             w2, b1s, b2s, act)
        return out, torch.autograd.grad(out, leaves, grad.double(), allow_unused=True,
                                        materialize_grads=True)

    want_out, want_grads = reference()
    for backend in BACKENDS:
        leaves = [t.detach().clone().requires_grad_() for t in low]
        xs, ws, gus, dns = leaves[:4]
        b1s, b2s = (leaves[4], leaves[5]) if bias else (None, None)

        def run():
            return moeyard.expert_ffn(xs, p, ws, gus, dns, b1s, b2s, act, layout, backend=backend)

        if backend == "grouped_mm" and not ref.grouped_mm_serves(device, dtype, cap, (H, N1, I)):
            rep.refusal("ffn", name, dtype, backend, run)
            continue
        poison(device)
        try:
            out = run()
            got = torch.autograd.grad(out, leaves, grad.to(dtype), allow_unused=True,
                                      materialize_grads=True)
        except Exception as ex:  # noqa: BLE001  (reported, the other cases go on)
            rep.add("ffn", name, dtype, backend, False, error=f"{type(ex).__name__}: {ex}"[:300])
            continue
        errs = {"out": rel_err(out, want_out)}
        names = ["x", "weights", "gate_up", "down"] + (["b1", "b2"] if bias else [])
        errs.update({f"grad_{n}": rel_err(g, wg) for n, g, wg in zip(names, got, want_grads)})
        finite = all(torch.isfinite(t).all().item() for t in (out, *got))
        dead_zero = bool((out[dead] == 0).all()) and bool((got[0][dead] == 0).all())
        ok = finite and dead_zero and all(e <= TOL[dtype] for e in errs.values())
        rep.add("ffn", name, dtype, backend, ok, finite=finite, dead_zero=dead_zero,
                max_err=max(errs.values()), errors=errs)


def check_gmm(rep, device, dtype, case):
    name, R, E, K, N, mode, order = case
    dev = dict(device=device)
    counts = torch.distributions.Multinomial(R, torch.ones(E)).sample().long()
    cap = None
    if mode == "capacity":
        cap = int(counts.max()) + 3
        a_rows, a_index = E * cap, None
    else:
        a_rows = R // 2 + 5 if mode == "gathered" else R
        a_index = (torch.randint(-1, a_rows, (R,), **dev).to(torch.int32)
                   if mode == "gathered" else None)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    offsets = offsets.to(device)
    a = torch.randn(a_rows, K, **dev).to(dtype)
    b = (torch.randn(E, K, N, **dev) if order == "kn"
         else torch.randn(E, N, K, **dev).transpose(1, 2)) / math.sqrt(K)
    b = b.to(dtype)
    rows_out = R if a_index is not None else a_rows
    grad = torch.randn(rows_out, N, **dev).to(dtype)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    want = ref.grouped_mm(a64, b64, offsets, a_index, cap)
    want_grads = torch.autograd.grad(want, (a64, b64), grad.double())
    unused = ~ref.expert_rows(offsets, cap, rows_out)[1].to(device)
    for backend in BACKENDS:
        ac, bc = a.clone().requires_grad_(), b.detach().clone().requires_grad_()
        if order == "nk":  # keep b's memory order (clone() of a transposed view keeps strides)
            assert bc.stride(1) == 1

        def run():
            return moeyard.grouped_mm(ac, bc, offsets, a_index, cap, backend=backend)

        if backend == "grouped_mm" and not ref.grouped_mm_serves(device, dtype, cap, (K, N)):
            rep.refusal("grouped_mm", name, dtype, backend, run)
            continue
        poison(device)
        try:
            out = run()
            ga, gb = torch.autograd.grad(out, (ac, bc), grad)
        except Exception as ex:  # noqa: BLE001
            rep.add("grouped_mm", name, dtype, backend, False,
                    error=f"{type(ex).__name__}: {ex}"[:300])
            continue
        errs = dict(out=rel_err(out, want), grad_a=rel_err(ga, want_grads[0]),
                    grad_b=rel_err(gb, want_grads[1]))
        finite = all(torch.isfinite(t).all().item() for t in (out, ga, gb))
        zeros = bool((out[unused] == 0).all())
        ok = finite and zeros and gb.stride() == bc.stride() and \
            all(e <= TOL[dtype] for e in errs.values())
        rep.add("grouped_mm", name, dtype, backend, ok, finite=finite, unused_zero=zeros,
                max_err=max(errs.values()), errors=errs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, a few cases: the plumbing")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_smoke else args.device
    ffn_cases = [c for c in FFN_CASES if not args.cpu_smoke or c[0] in SMOKE_FFN]
    gmm_cases = GMM_CASES[:2] + GMM_CASES[3:] if args.cpu_smoke else GMM_CASES
    torch.manual_seed(int(time.time()))  # fresh inputs every run; the seed is recorded
    seed = torch.initial_seed()
    rep, t0 = Report(), time.time()
    for dtype in DTYPES:
        for case in ffn_cases:
            check_ffn(rep, device, dtype, case)
        for case in gmm_cases:
            check_gmm(rep, device, dtype, case)
    ran = [r for r in rep.rows if not r.get("refused")]
    worst = {}
    for r in ran:
        key = (r["dtype"], r["backend"])
        worst[key] = max(worst.get(key, 0.0), r.get("max_err", 0.0))
    summary = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   torch=torch.__version__, seed=seed, seconds=round(time.time() - t0, 1),
                   checks=len(rep.rows), refusals=len(rep.rows) - len(ran),
                   failures=rep.failures,
                   worst_error={f"{d} {b}": e for (d, b), e in sorted(worst.items())})
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "check_experts.json"), "w") as fh:
        json.dump(dict(summary, rows=rep.rows), fh, indent=1)
    print(f"check_experts on {summary['device']}: {summary['checks']} checks "
          f"({summary['refusals']} expected refusals), {rep.failures} failed, seed {seed}, "
          f"{summary['seconds']} s")
    for k, e in summary["worst_error"].items():
        print(f"  worst relative error {k}: {e:.2e}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
