"""Expert-compute benchmark: the moeyard MoE layer, on each of its expert-compute backends, against
what a user would pick instead, same GPU, one run (issues 3 and 6). bf16 throughout; fp32 router
math.

Shapes (d_model, d_ff per expert, experts, top_k, tokens), as in the anchor run:
  qwen3moe (2048, 768, 128, 8, 16384), mixtral (4096, 14336, 8, 2, 8192),
  olmoe (2048, 1024, 64, 8, 16384)
Routing: softmax -> top-k -> renormalize of the router logits ``x @ router.T`` (x ~ N(0,1), router
weight ~ N(0, 0.02)), either "uniform" (those logits as they are) or "zipf" (plus a log-Zipf bias
per expert, ``-s * log(rank)``, ranks a fixed random permutation, s = --zipf-s, default 1.2; the
resulting max/mean load is printed: with k=8 this is close to the worst case, max/mean <= E/k).
Order: every shape on the first routing (all rows below), then every shape's layer rows on the
other routings, so a run cut short by --budget-s loses the skewed rows first.

Rows per shape (moeyard's rows are labelled with the backend, "moeyard layer [grouped_mm]",
"moeyard layer [moeyard]", and carry ``backend`` and ``auto`` fields: ``auto`` marks the backend
that backend="auto" takes for bf16 on this device, from moeyard.experts_backend_table() or
MOEYARD_EXPERTS_BACKEND, recorded as the JSON's "auto_backend"; "auto" itself is not timed again):
  moeyard layer [b]  router matmul + moeyard.route + moeyard.plan + moeyard.expert_ffn(backend=b)
                     (layout "linear", Hugging Face v5 weights gate_up [E,2f,d], down [E,d,f]) for
                     b = grouped_mm (torch's CUTLASS grouped GEMM around moeyard's gather,
                     activation and combine) and b = moeyard (moeyard's own grouped GEMM); fwd
                     (no_grad) and fwd+bwd (loss out.float().pow(2).mean(), grads to x, router
                     weight, gate_up, down); each routing
  stock pipeline     the same layer written with stock PyTorch on torch._grouped_mm (the anchor
                     run's grouped_layer, with histc counts instead of a host-syncing bincount),
                     same weights; fwd and fwd+bwd; each routing
  inference          qwen3moe and mixtral at T = --infer-tokens (1, 8, 64) tokens, fwd only
                     (no_grad), mode "infer T=<T>": moeyard layer [b] for each backend, the stock
                     pipeline and the HF grouped_mm block; L2 flushed (a 256 MiB read) before
                     each timed call. Such a layer reads far more weight bytes than it computes:
                     the floor is reading each SELECTED expert's weights once, bytes = (distinct
                     experts the routing selected, counted on the device before timing; the HF
                     block's own router for its row) * 3 * d * f * 2, floor time = bytes / HBM
                     bandwidth (--hbm-gbps, else by device name: H200 4800 GB/s, H100 SXM 3350;
                     the JSON's "hbm" says which). Columns: ms, GB/s = bytes / time, % of the
                     floor = floor time / time * 100 (100 = at the floor).
  moeyard grouped_mm [b] / torch._grouped_mm
                     the FFN's two GEMMs alone on balanced offsets (T*k/E rows per expert), same
                     inputs (weights as the transposed views of the HF-layout tensors), each
                     backend; plus torch._grouped_mm on contiguous [E,K,N] copies (the anchor
                     run's layout)
  dense mm pair      two cuBLAS bf16 matmuls with the FFN's FLOPs: the ceiling
  HF block           transformers v5 MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock /
                     OlmoeSparseMoeBlock with config._experts_implementation "grouped_mm" and
                     "eager" (its own router; random weights N(0, 0.02)); fwd and fwd+bwd
  scattermoe GLUMLP  only with --scattermoe, if the package is importable
Before the moeyard rows of each routing, a spot check runs moeyard.expert_ffn on each backend
against the stock pipeline and an fp32 per-expert loop on the same routing: output and gradients
(x, routing weights, gate_up, down), relative Frobenius error, a WARNING above 2e-2; and whether
backend="auto" gives that backend's output bit for bit.

Columns: ms = median of CUDA-event timings of single calls after warm-up (launch and host time
included, as an eager user sees it); TFLOP/s = FFN FLOPs (2*T*k*3*d*f forward, x3 for fwd+bwd) /
time; peak MiB (fwd+bwd only) = torch.cuda.max_memory_allocated() during one step minus
memory_allocated() before it, inputs and weights allocated, .grad set to None first (so the
parameter gradients the step creates are counted; their size is in the row's note).

Targets (printed met / NOT MET with the numbers, never asserted), moeyard's layer on the backend
auto picks, uniform routing: qwen3moe fwd <= 3.0 ms, fwd+bwd <= 9.0 ms, fwd+bwd peak extra memory
<= 1.9 GiB; mixtral fwd+bwd <= 33 ms.

Time (default run, all shapes, both routings, HF blocks, inference rows): predicted ~60 s on an
H100 or H200, from the anchors' per-call times (spec/ANCHORS-MEASURED.md, H100) times the calls
made (reps: layer 5 warm-up + 20 timed, +1 for the peak; GEMMs 5 + 20; HF 2 + 8; inference 10 + 40),
moeyard's backends taken as the stock pipeline's time (mixtral: 1.5x, a guess for its own kernel)
and the zipf pass as twice the uniform one:
  qwen3moe  layers 1.7 s, checks 0.2, GEMMs 0.3, inference 0.3, HF 2.5 (eager 2.0), zipf 3.8
  mixtral   layers 4.6 s, checks 0.5, GEMMs 1.4, inference 0.6, HF 1.1, zipf 10.2
  olmoe     layers 1.9 s, checks 0.2, GEMMs 0.4, HF 1.5, zipf 4.2
  = ~36 s on the GPU, plus ~25 s of overheads (interpreter, CUDA context and first calls ~13 s,
  transformers import ~5 s, gc + empty_cache after each of ~75 row groups ~7 s).
That leaves room for a 3x miss (an unmeasured moeyard kernel far slower than assumed); --budget-s
(default 200) caps it anyway: once that many seconds have passed since the start, every row group
not yet begun is skipped and listed in the JSON's "skipped" (a group already running finishes).

Prints a table per shape and a "targets" block; writes JSON (rewritten after every row, so a run
cut short keeps what it measured) to $OUT/bench_experts.json (OUT default "out").

    python benchmarks/bench_experts.py [--shapes qwen3moe,olmoe] [--routings uniform] [--quick]
        [--skip-hf] [--infer-tokens 1,8,64] [--hbm-gbps 4800] [--budget-s 200] [--cpu-smoke]
"""
import argparse
import functools
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = {  # name: (d_model, d_ff per expert, experts, top_k, tokens); the targets' shape first
    "qwen3moe": (2048, 768, 128, 8, 16384),
    "mixtral": (4096, 14336, 8, 2, 8192),
    "olmoe": (2048, 1024, 64, 8, 16384),
}
SMOKE_SHAPES = {"tiny": (64, 96, 8, 2, 256)}  # --cpu-smoke only: plumbing, not performance
HF_FAMILY = {"tiny": "qwen3moe"}  # the HF block a shape without its own runs (--cpu-smoke)
HF_SEQ = 2048  # HF blocks take [B, S, d]: the T tokens as T // HF_SEQ sequences
INFER_SHAPES = ("qwen3moe", "mixtral", "tiny")  # the shapes with inference rows
BACKENDS = ("grouped_mm", "moeyard")  # moeyard's expert-compute backends: a row each
WEIGHT_BYTES = 2  # bf16 expert weights
# HBM bandwidth (datasheet, GB/s = 1e9 B/s) for the inference rows' floor: (a part of the device
# name, GB/s, the part it names), first match
HBM_GBPS = (("H200", 4800, "H200 (HBM3e)"), ("H100 PCIe", 2000, "H100 PCIe"),
            ("H100 NVL", 3900, "H100 NVL"), ("H100", 3350, "H100 SXM (HBM3)"))
L2_FLUSH_BYTES = 256 * 2**20  # read before each timed inference call: 5x an H100/H200's L2

# impl labels (targets and benchmarks/summary.py look rows up by them); moeyard's carry the
# backend: labelled(LAYER, "grouped_mm") == "moeyard layer [grouped_mm]"
LAYER = "moeyard layer"
STOCK = "stock pipeline"
GMM = "moeyard grouped_mm"
TGMM = "torch._grouped_mm"
TGMM_KN = "torch._grouped_mm [E,K,N] copy"
DENSE = "dense mm pair"
HF_GROUPED = "HF block grouped_mm"
HF_EAGER = "HF block eager"

# this stage's targets, on the uniform routing, for the backend "auto" picks:
# (shape, mode, row field, limit in ms or MiB)
TARGETS = (("qwen3moe", "fwd", "ms", 3.0), ("qwen3moe", "fwd+bwd", "ms", 9.0),
           ("qwen3moe", "fwd+bwd", "peak_mib", 1.9 * 1024), ("mixtral", "fwd+bwd", "ms", 33.0))

DEV = "cuda"
OUT = os.environ.get("OUT", "out")
ROWS = []
META = {}
DEADLINE = None  # time.time() past which safe() skips what is left (--budget-s; None: no limit)


def ffn_flops(T, d, f, k):
    return 2 * T * k * 3 * d * f


def labelled(impl, backend):
    return f"{impl} [{backend}]"


def infer_mode(tokens):
    return f"infer T={tokens}"


def backend_fields(backend):
    """The row fields of a moeyard row on ``backend``: it, and whether "auto" picks it."""
    return dict(backend=backend, auto=backend == META.get("auto_backend"))


# ------------------------------------------------------------------------------------ timing


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, warmup, reps, before=None):
    """Median ms of ``reps`` single calls after ``warmup`` calls (CUDA events; CPU: wall clock).
    ``before()``, if given, runs (and finishes) before each timed call, outside the timing."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
            sync()
        if DEV == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


_L2_FLUSH = []


def flush_l2():
    """Evict the GPU's L2 cache: read a buffer several times its size (a read leaves no dirty
    lines to write back during the next timed call). No-op on the CPU."""
    if DEV != "cuda":
        return
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=DEV))
    _L2_FLUSH[0].sum()


def clear_grads(params):
    for p in params:
        p.grad = None


def peak_extra_mib(step, params):
    """Peak memory of one ``step`` above what was allocated before it, grads reset to None first."""
    clear_grads(params)
    if DEV != "cuda":
        step()
        clear_grads(params)
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear_grads(params)
    return peak / 2**20


def grads_mib(params):
    return sum(p.numel() * p.element_size() for p in params) / 2**20


def record(shape, routing, impl, mode, ms, flops, peak=None, note="", **fields):
    """One result row (printed, kept, the JSON rewritten); ``fields`` go into the row as they are
    (a moeyard row's backend_fields, an inference row's bytes and floor)."""
    tf = flops / (ms * 1e-3) / 1e12 if flops and ms else None
    if fields.get("auto"):
        note = f"auto's pick; {note}" if note else "auto's pick"
    ROWS.append(dict(shape=shape, routing=routing, impl=impl, mode=mode, ms=ms, tflops=tf,
                     peak_mib=peak, note=note, **fields))
    pk = f"{peak:8.0f} MiB" if peak is not None else " " * 12
    tfs = f"{tf:5.0f}" if tf is not None else "    -"
    print(f"{shape:9s} {routing:8s} {impl:32s} {mode:10s} {ms:9.3f} ms {tfs} TFLOP/s {pk}  {note}",
          flush=True)
    dump()


def dump(final=False):
    os.makedirs(OUT, exist_ok=True)
    doc = dict(META, rows=ROWS, complete=final)
    if final:
        doc["targets"] = targets(ROWS, META.get("auto_backend"))
    with open(os.path.join(OUT, "bench_experts.json"), "w") as fh:
        json.dump(doc, fh, indent=1)


def safe(label, fn, errors="bench_experts_errors.txt"):
    """Run one anchor; on any error print it, append its traceback to $OUT/``errors`` and go on
    (one failure must not lose the rest). Past DEADLINE, skip it instead and list ``label`` in
    the JSON's "skipped"."""
    if DEADLINE is not None and time.time() > DEADLINE:
        print(f"-- skipped {label}: past the time budget (--budget-s)", flush=True)
        META.setdefault("skipped", []).append(label)
        dump()
        return
    try:
        fn()
    except Exception as ex:  # noqa: BLE001
        print(f"!! {label}: {type(ex).__name__}: {str(ex)[:400]}", flush=True)
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, errors), "a") as fh:
            fh.write(f"== {label}\n")
            traceback.print_exc(file=fh)
    finally:
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- routing


def zipf_bias(E, s, seed=1):
    """fp32 [E] log-Zipf logit bias: -s * log(rank), ranks 1..E in a fixed random order."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(E, generator=g).float() + 1
    return (-s * rank.log()).to(DEV)


def router_logits(x, router_w, logit_bias):
    logits = F.linear(x, router_w).float()
    return logits if logit_bias is None else logits + logit_bias


def stock_route(logits, k):
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


def load_of(idx, E):
    counts = torch.bincount(idx.flatten().long(), minlength=E).float()
    return dict(max_over_mean=(counts.max() / counts.mean()).item(),
                idle_experts=int((counts == 0).sum().item()))


# ------------------------------------------------------------------------------ the pipelines


def stock_experts(x, w, idx, w13, w2):
    """Stock PyTorch experts + combine (the anchor run's grouped_layer after its routing).

    w13 logical [E, d, 2f], w2 logical [E, f, d]; w [T, k] routing weights, idx [T, k] experts."""
    T, k = idx.shape
    E = w13.shape[0]
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1)  # bincount would sync
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w13, offs=offs)  # [T*k, 2f]
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, w2, offs=offs)  # [T*k, d]
    y = y * w.flatten()[order].to(y.dtype).unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, tok, y)


def stock_layer(x, router_w, gate_up, down, k, logit_bias):
    w, idx = stock_route(router_logits(x, router_w, logit_bias), k)
    return stock_experts(x, w, idx, gate_up.transpose(1, 2), down.transpose(1, 2))


def moeyard_layer(x, router_w, gate_up, down, k, logit_bias, backend="auto"):
    import moeyard
    w, e = moeyard.route(router_logits(x, router_w, logit_bias), k, renormalize=True)
    p = moeyard.plan(e, gate_up.shape[0])
    return moeyard.expert_ffn(x, p, w, gate_up, down, layout="linear", backend=backend)


def layer_impls():
    """The timed layers: [(impl label, layer(x, router_w, gate_up, down, k, logit_bias), row
    fields)], moeyard's on each backend, then the stock pipeline."""
    impls = [(labelled(LAYER, b), functools.partial(moeyard_layer, backend=b), backend_fields(b))
             for b in BACKENDS]
    return impls + [(STOCK, stock_layer, {})]


def auto_backend():
    """(backend, where from) that backend="auto" takes for bf16 on this run's device:
    MOEYARD_EXPERTS_BACKEND if set, else moeyard.experts_backend_table()'s entry."""
    import moeyard
    table = moeyard.experts_backend_table()
    if table["env_value"] not in (None, "", "auto"):
        return table["env_value"], f"{table['env']}={table['env_value']}"
    dev = "cpu" if DEV == "cpu" else f"cuda:{torch.cuda.current_device()}"
    entry = next((d for d in table["devices"] if d["device"] == dev), None)
    if entry is None:  # a library built without CUDA kernels lists no GPU
        return None, f"moeyard.experts_backend_table() lists no {dev}"
    return entry["auto"]["bfloat16"], f"moeyard.experts_backend_table(), {dev} bfloat16"


def fp32_experts(x, w, idx, gate_up, down):
    """fp32 per-expert loop (the activation rounded to x's dtype, as moeyard keeps it)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        t, j = (idx == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        g, u = (x[t].float() @ gate_up[e].float().t()).chunk(2, dim=-1)
        a = (F.silu(g) * u).to(x.dtype).float()
        out.index_add_(0, t, (a @ down[e].float().t()) * w[t, j].float().unsqueeze(-1))
    return out


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def loss_of(out):
    return out.float().pow(2).mean()


CHECKED = ("out", "x", "weights", "gate_up", "down")  # what the spot check compares


def out_and_grads(experts, inputs):
    """[output, then the gradients of loss_of(output) w.r.t. each of ``inputs``] of
    ``experts(*inputs)``, the inputs as fresh leaves (their storage shared, not copied)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = experts(*leaves)
    loss_of(out).backward()
    return [out.detach()] + [t.grad for t in leaves]


def errors(got, ref):
    return {n: rel_err(a, b) for n, a, b in zip(CHECKED, got, ref)}


def spot_check(c, routing, logit_bias, tol=2e-2):
    """moeyard.expert_ffn on each backend vs the stock pipeline and vs the fp32 loop, on one
    routing of case ``c``: output and gradients (x, routing weights, gate_up, down). One entry per
    backend in META["checks"]; "same_as_auto": auto's output is that backend's, bit for bit."""
    import moeyard
    with torch.no_grad():
        w, e = moeyard.route(router_logits(c.x, c.router_w, logit_bias), c.k, renormalize=True)
        p = moeyard.plan(e, c.E)
        idx = e.long()
    inputs = (c.x, w, c.gate_up, c.down)

    def ffn(backend):
        return lambda x, w, g, d: moeyard.expert_ffn(x, p, w, g, d, layout="linear",
                                                     backend=backend)
    ref = out_and_grads(lambda x, w, g, d: fp32_experts(x, w, idx, g, d), inputs)
    stock = out_and_grads(
        lambda x, w, g, d: stock_experts(x, w, idx, g.transpose(1, 2), d.transpose(1, 2)), inputs)
    with torch.no_grad():
        auto_out = ffn("auto")(*inputs)
    stock_ref = errors(stock, ref)
    print(f"check {c.name} {routing}: stock vs fp32 loop rel. err " +
          ", ".join(f"{n} {v:.1e}" for n, v in stock_ref.items()), flush=True)

    def check(b):
        got = out_and_grads(ffn(b), inputs)
        res = dict(shape=c.name, routing=routing, backend=b, vs_stock=errors(got, stock),
                   vs_fp32=errors(got, ref), stock_vs_fp32=stock_ref,
                   same_as_auto=torch.equal(got[0], auto_out))
        errs = list(res["vs_stock"].values()) + list(res["vs_fp32"].values())
        res["warning"] = not all(v <= tol for v in errs)  # NaN warns too
        META.setdefault("checks", []).append(res)
        print(f"check {c.name} {routing} [{b}] rel. err vs stock / vs fp32 loop: " +
              ", ".join(f"{n} {res['vs_stock'][n]:.1e}/{res['vs_fp32'][n]:.1e}" for n in CHECKED) +
              f"; output {'=' if res['same_as_auto'] else '!='} auto's", flush=True)
        if res["warning"]:
            print(f"WARNING {c.name} {routing} [{b}]: moeyard differs from the stock pipeline or "
                  f"the fp32 loop by more than {tol:.0e} (relative)", flush=True)
        if b == META.get("auto_backend") and not res["same_as_auto"]:
            print(f"NOTE {c.name} {routing}: auto's output is not [{b}]'s, which the table names",
                  flush=True)
    for b in BACKENDS:  # one failing backend must not lose the other's check
        safe(f"check {c.name} {routing} [{b}]", lambda b=b: check(b))


# ------------------------------------------------------------------------------- per shape


class Case:
    """One shape's tensors, bf16 on DEV (seed 0: every pass over a shape gets the same ones):
    tokens x [T, d], router weight [E, d], experts in Hugging Face v5 layout gate_up [E, 2f, d],
    down [E, d, f], all requiring grad (``params``)."""

    def __init__(self, name, d, f, E, k, T):
        torch.manual_seed(0)
        self.name, self.d, self.f, self.E, self.k, self.T = name, d, f, E, k, T
        self.flops = ffn_flops(T, d, f, k)
        bf = dict(device=DEV, dtype=torch.bfloat16)
        self.x = torch.randn(T, d, **bf).requires_grad_(True)
        self.router_w = (torch.randn(E, d, **bf) * 0.02).requires_grad_(True)
        self.gate_up = (torch.randn(E, 2 * f, d, **bf) * 0.02).requires_grad_(True)
        self.down = (torch.randn(E, d, f, **bf) * 0.02).requires_grad_(True)
        self.params = [self.x, self.router_w, self.gate_up, self.down]

    def call(self, layer, logit_bias, x=None):
        return layer(self.x if x is None else x, self.router_w, self.gate_up, self.down, self.k,
                     logit_bias)


def layer_rows(c, routing, args, reps):
    """The spot check, then each layer of layer_impls(), fwd and fwd+bwd, on one routing."""
    lb = zipf_bias(c.E, args.zipf_s) if routing == "zipf" else None
    with torch.no_grad():
        _, idx = stock_route(router_logits(c.x, c.router_w, lb), c.k)
        load = load_of(idx, c.E)
    del idx
    META.setdefault("loads", []).append(dict(shape=c.name, routing=routing, **load))
    lnote = f"max/mean load {load['max_over_mean']:.2f}, {load['idle_experts']} idle"
    gnote = f"grads {grads_mib(c.params):.0f} MiB incl."
    print(f"{c.name} {routing}: {lnote}", flush=True)

    safe(f"check {c.name} {routing}", lambda: spot_check(c, routing, lb))

    wl, rl = reps["layer"]
    for impl, layer, fields in layer_impls():
        def fwd(layer=layer):
            with torch.no_grad():
                c.call(layer, lb)

        def step(layer=layer):
            loss_of(c.call(layer, lb)).backward()

        def rows(impl=impl, fwd=fwd, step=step, fields=fields):
            record(c.name, routing, impl, "fwd", bench(fwd, wl, rl), c.flops, note=lnote, **fields)
            ms = bench(step, wl, rl)
            peak = peak_extra_mib(step, c.params)
            record(c.name, routing, impl, "fwd+bwd", ms, 3 * c.flops, peak, f"{lnote}; {gnote}",
                   **fields)
            clear_grads(c.params)
        safe(f"{impl} {c.name} {routing}", rows)
        clear_grads(c.params)


def infer_input(T, d):
    """The inference rows' tokens: [T, d] bf16, the same for every implementation of a shape."""
    g = torch.Generator(device=DEV).manual_seed(1000 + T)
    return torch.randn(T, d, generator=g, device=DEV, dtype=torch.bfloat16)


def infer_rows(shape, routing, impl, forward, router_w, f, k, tokens, reps, **fields):
    """Decode-sized rows: ``forward(x)`` under no_grad for x [T, d], T in ``tokens``, each timed
    call after an L2 flush, against the floor of reading every expert that ``router_w``'s
    softmax top-k selects for x once (counted on the device before timing)."""
    E, d = router_w.shape
    w, r = reps["infer"]
    for T in tokens:
        x = infer_input(T, d)
        with torch.no_grad():
            _, idx = stock_route(router_logits(x, router_w, None), k)
            n = int((torch.bincount(idx.flatten(), minlength=E) > 0).sum().item())
            ms = bench(lambda x=x: forward(x), w, r, before=flush_l2)
        nbytes = n * 3 * d * f * WEIGHT_BYTES
        gbps = nbytes / (ms * 1e-3) / 1e9
        hbm = META["hbm"]["gbps"]
        floor_ms = nbytes / (hbm * 1e9) * 1e3 if hbm else None
        pct = 100 * floor_ms / ms if floor_ms else None
        note = f"{n} experts read, {nbytes / 1e6:.1f} MB: {gbps:.0f} GB/s" + (
            f", {pct:.0f}% of the floor {floor_ms * 1e3:.1f} us" if pct is not None else "")
        record(shape, routing, impl, infer_mode(T), ms, ffn_flops(T, d, f, k), note=note,
               tokens=T, experts_read=n, bytes=nbytes, gbps=gbps, floor_ms=floor_ms,
               floor_pct=pct, **fields)


def layer_infer_rows(c, args, reps):
    for impl, layer, fields in layer_impls():
        safe(f"{impl} {c.name} inference",
             lambda impl=impl, layer=layer, fields=fields: infer_rows(
                 c.name, "uniform", impl, lambda x: c.call(layer, None, x), c.router_w, c.f, c.k,
                 args.infer_tokens, reps, **fields))


def gemm_rows(c, reps):
    """The FFN's two GEMMs alone, balanced: moeyard.grouped_mm on each backend next to
    torch._grouped_mm, and the dense pair of the same FLOPs."""
    import moeyard
    wg, rg = reps["gemm"]
    name, d, f, E, k, T, fl = c.name, c.d, c.f, c.E, c.k, c.T, c.flops
    bf = dict(device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        per = T * k // E
        a1 = torch.randn(T * k, d, **bf)
        a2 = torch.randn(T * k, f, **bf)
        offs_m = (torch.arange(E + 1, device=DEV) * per).to(torch.int32)  # moeyard: [E+1], from 0
        offs_t = (torch.arange(1, E + 1, device=DEV) * per).to(torch.int32)  # torch: [E] ends
        w1, w2 = c.gate_up.detach().transpose(1, 2), c.down.detach().transpose(1, 2)

        def gemms_moeyard(b):
            err = rel_err(moeyard.grouped_mm(a1, w1, offs_m, backend=b),
                          torch._grouped_mm(a1, w1, offs=offs_t))
            print(f"check {name} grouped_mm [{b}] vs torch._grouped_mm rel. err {err:.2e}",
                  flush=True)
            ms = bench(lambda: (moeyard.grouped_mm(a1, w1, offs_m, backend=b),
                                moeyard.grouped_mm(a2, w2, offs_m, backend=b)), wg, rg)
            record(name, "balanced", labelled(GMM, b), "fwd", ms, fl,
                   note=f"2 GEMMs, {per} rows/expert; rel. err {err:.1e}", **backend_fields(b))
        for b in BACKENDS:
            safe(f"{labelled(GMM, b)} {name}", lambda b=b: gemms_moeyard(b))

        def gemms_torch(w1, w2, impl, note):
            ms = bench(lambda: (torch._grouped_mm(a1, w1, offs=offs_t),
                                torch._grouped_mm(a2, w2, offs=offs_t)), wg, rg)
            record(name, "balanced", impl, "fwd", ms, fl, note=note)
        safe(f"{TGMM} {name}",
             lambda: gemms_torch(w1, w2, TGMM, "same inputs (HF weights transposed)"))
        safe(f"{TGMM_KN} {name}", lambda: gemms_torch(w1.contiguous(), w2.contiguous(), TGMM_KN,
                                                      "anchor run's layout"))

        def dense_pair():
            wd1 = torch.randn(d, 2 * f, **bf)
            wd2 = torch.randn(f, d, **bf)
            ms = bench(lambda: (a1 @ wd1, a2 @ wd2), wg, rg)
            record(name, "-", DENSE, "fwd", ms, fl, note="cuBLAS, same FLOPs: the ceiling")
        safe(f"dense {name}", dense_pair)


def run_shape(name, dims, routing, first, args, reps):
    """One shape on one routing: the layers; on the first routing also the inference rows and
    the GEMMs alone."""
    c = Case(name, *dims)
    layer_rows(c, routing, args, reps)
    if first:
        if name in INFER_SHAPES and args.infer_tokens:
            layer_infer_rows(c, args, reps)
        gemm_rows(c, reps)


def hf_block(name, d, f, E, k, impl):
    from transformers import MixtralConfig, Qwen3MoeConfig
    name = HF_FAMILY.get(name, name)
    if name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls
        cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E,
                            num_experts_per_tok=k)
    elif name == "qwen3moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls
        cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=E,
                             num_experts_per_tok=k, norm_topk_prob=True)
    elif name == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as cls
        cfg = OlmoeConfig(hidden_size=d, intermediate_size=f, num_experts=E,
                          num_experts_per_tok=k, norm_topk_prob=False)
        if not hasattr(cfg, "num_local_experts"):  # what v5's OlmoeExperts reads
            cfg.num_local_experts = E
    else:
        raise KeyError(f"no Hugging Face block for shape {name!r}")
    cfg._experts_implementation = impl
    with torch.device(DEV):
        blk = cls(cfg)
    blk = blk.to(torch.bfloat16)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(std=0.02)
    return blk, cls.__name__


def run_hf(name, d, f, E, k, T, args, reps):
    import transformers
    META["transformers"] = transformers.__version__
    fl = ffn_flops(T, d, f, k)
    S = min(HF_SEQ, T)
    for impl, label in (("grouped_mm", HF_GROUPED), ("eager", HF_EAGER)):
        def one(impl=impl, label=label):
            blk, cls = hf_block(name, d, f, E, k, impl)
            x = torch.randn(T // S, S, d, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
            params = [x] + list(blk.parameters())
            note = f"{cls}, own router"

            def fwd():
                with torch.no_grad():
                    blk(x)

            def step():
                out = blk(x)
                loss_of(out[0] if isinstance(out, tuple) else out).backward()

            w, r = reps["hf"]
            record(name, "hf", label, "fwd", bench(fwd, w, r), fl, note=note)
            if impl == "grouped_mm" and name in INFER_SHAPES and args.infer_tokens:
                router = blk.gate if hasattr(blk, "gate") else blk.router
                safe(f"{label} {name} inference", lambda: infer_rows(
                    name, "hf", label, lambda xi: blk(xi[None]), router.weight.detach(), f, k,
                    args.infer_tokens, reps))
            if impl == "eager":  # eager loops over experts in Python: time one step first
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                once = time.perf_counter() - t0
                clear_grads(params)
                if once > args.hf_eager_max_s:
                    print(f"skip {name} {label} fwd+bwd: one step took {once:.1f} s", flush=True)
                    return
                w, r = reps["hf_eager_bwd"]
            ms = bench(step, w, r)
            peak = peak_extra_mib(step, params)
            record(name, "hf", label, "fwd+bwd", ms, 3 * fl, peak,
                   f"{note}; grads {grads_mib(params):.0f} MiB incl.")
            clear_grads(params)
        safe(f"{label} {name}", one)


def run_scattermoe(name, d, f, E, k, T, reps):
    from scattermoe.mlp import GLUMLP
    fl = ffn_flops(T, d, f, k)
    mlp = GLUMLP(d, f, E, k).to(DEV, torch.bfloat16)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=0.02)
    x = torch.randn(T, d, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
    router_w = (torch.randn(E, d, device=DEV, dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    params = [x, router_w] + list(mlp.parameters())

    def fwd():
        with torch.no_grad():
            w, idx = stock_route(router_logits(x, router_w, None), k)
            mlp(x, w.to(x.dtype), idx)

    def step():
        w, idx = stock_route(router_logits(x, router_w, None), k)
        loss_of(mlp(x, w.to(x.dtype), idx)).backward()

    w, r = reps["layer"]
    record(name, "uniform", "scattermoe GLUMLP", "fwd", bench(fwd, w, r), fl)
    ms = bench(step, w, r)
    peak = peak_extra_mib(step, params)
    record(name, "uniform", "scattermoe GLUMLP", "fwd+bwd", ms, 3 * fl, peak)


# ----------------------------------------------------------------------------- report


def find(rows, shape, impl, mode, routing=None):
    for r in rows:
        if r["shape"] == shape and r["impl"] == impl and r["mode"] == mode and \
                (routing is None or r["routing"] == routing):
            return r
    return None


def targets(rows, auto):
    """This stage's targets (TARGETS) checked on this run's rows of moeyard's layer on ``auto``,
    the backend "auto" picks: [dict(target, met, detail)]; met is None where a row it needs was
    not measured. The detail also gives the other backends' figures."""
    res = []
    for shape, mode, field, limit in TARGETS:
        def show(v, field=field):
            return f"{v / 1024:.2f} GiB" if field == "peak_mib" else f"{v:.2f} ms"

        def value(backend, shape=shape, mode=mode, field=field):
            r = find(rows, shape, labelled(LAYER, backend), mode, "uniform")
            return None if r is None else r[field]
        what = "peak extra memory" if field == "peak_mib" else "time"
        target = f"{shape} layer {mode} {what} <= {show(limit)}"
        v = value(auto) if auto else None
        if v is None:
            res.append(dict(target=target, met=None, detail="not measured"))
            continue
        others = [f"[{b}] {show(value(b))}" for b in BACKENDS if b != auto and value(b) is not None]
        res.append(dict(target=target, met=v <= limit, value=v, limit=limit,
                        detail=f"{show(v)} on [{auto}], auto's pick" +
                        "".join(f"; {o}" for o in others)))
    return res


def print_targets(rows, auto, heading="targets"):
    print(f"\n{heading} (moeyard layer on the backend auto picks: {auto or 'unknown'})")
    for t in targets(rows, auto):
        met = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        print(f"  {met:12s} {t['target']}: {t['detail']}")


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_report(rows):
    print("\n| shape | implementation | routing | mode | ms | TFLOP/s | peak extra MiB | note |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for r in (r for r in rows if r["shape"] == shape):
            print(f"| {shape} | {r['impl']} | {r['routing']} | {r['mode']} | {r['ms']:.3f} | "
                  f"{fmt(r['tflops'], '.0f')} | {fmt(r['peak_mib'], '.0f')} | {r['note']} |")
    hbm = META.get("hbm", {})
    print(f"\ninference floor: HBM {fmt(hbm.get('gbps'), '.0f') or '?'} GB/s ({hbm.get('source')})")
    if META.get("skipped"):
        print(f"skipped (past --budget-s {META['args']['budget_s']:.0f} s): "
              + ", ".join(META["skipped"]))
    print_targets(rows, META.get("auto_backend"))


# -------------------------------------------------------------------------------------- main


def hbm_gbps(dev_name, override):
    """(GB/s, where from) of the device's HBM: ``override``, else HBM_GBPS's first match."""
    if override:
        return override, "--hbm-gbps"
    for key, gbps, part in HBM_GBPS:
        if key in dev_name:
            return gbps, f"datasheet figure of the {part}"
    return None, f"no figure for {dev_name!r}: pass --hbm-gbps"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated subset of {','.join(SHAPES)} (default: all)")
    ap.add_argument("--routings", default="uniform,zipf",
                    help="uniform, zipf or both (default); the first gets every row, the others "
                         "the layer rows only, after every shape's first")
    ap.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent of the skewed routing")
    ap.add_argument("--infer-tokens", default="1,8,64",
                    help="token counts of the inference rows (default 1,8,64; empty: none)")
    ap.add_argument("--hbm-gbps", type=float, default=None,
                    help="HBM bandwidth in GB/s for the inference floor (default: by device name, "
                         + ", ".join(f"{part} {v}" for _, v, part in HBM_GBPS) + ")")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="skip what is left (listed in the JSON as skipped) once this many seconds "
                         "have passed (default 200)")
    ap.add_argument("--quick", action="store_true", help="fewer warm-up calls and repetitions")
    ap.add_argument("--skip-hf", action="store_true", help="no Hugging Face transformers blocks")
    ap.add_argument("--scattermoe", action="store_true",
                    help="also time scattermoe's GLUMLP (if importable; Triton autotuning is slow)")
    ap.add_argument("--hf-eager-max-s", type=float, default=2.0,
                    help="skip HF eager fwd+bwd where one step takes longer (default 2 s)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the plumbing on CPU with one tiny shape (no GPU needed; the numbers "
                         "mean nothing)")
    args = ap.parse_args(argv)
    args.routings = [r for r in args.routings.split(",") if r]
    for r in args.routings:
        if r not in ("uniform", "zipf"):
            ap.error(f"unknown routing {r!r}")
    try:
        args.infer_tokens = [int(t) for t in args.infer_tokens.split(",") if t]
    except ValueError:
        ap.error(f"--infer-tokens takes comma-separated integers, got {args.infer_tokens!r}")
    if args.cpu_smoke:
        args.shapes = list(SMOKE_SHAPES)
    else:
        args.shapes = [s for s in args.shapes.split(",") if s]
        for s in args.shapes:
            if s not in SHAPES:
                ap.error(f"unknown shape {s!r} (known: {', '.join(SHAPES)})")
    return args


def main(argv=None):
    global DEV, DEADLINE
    t0 = time.time()
    args = parse_args(argv)
    DEADLINE = t0 + args.budget_s
    if args.cpu_smoke:
        DEV = "cpu"
        shapes = SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_experts.py: CUDA is not available (torch "
                     f"{torch.__version__}, CUDA build {torch.version.cuda}); this benchmark needs "
                     "a GPU. (--cpu-smoke runs its plumbing on CPU.)")
        shapes = SHAPES
    import moeyard

    os.makedirs(OUT, exist_ok=True)
    open(os.path.join(OUT, "bench_experts_errors.txt"), "w").close()  # this run's tracebacks
    if args.quick or args.cpu_smoke:
        reps = dict(layer=(1, 3), gemm=(2, 5), hf=(1, 2), hf_eager_bwd=(1, 1), infer=(2, 5))
    else:
        reps = dict(layer=(5, 20), gemm=(5, 20), hf=(2, 8), hf_eager_bwd=(1, 3), infer=(10, 40))
    dev_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    auto, auto_source = auto_backend()
    gbps, hbm_source = hbm_gbps(dev_name, args.hbm_gbps)
    META.update(device=dev_name, torch=torch.__version__, moeyard=moeyard.__version__,
                args=vars(args), reps=reps, shapes={s: shapes[s] for s in args.shapes},
                auto_backend=auto, auto_source=auto_source,
                hbm=dict(gbps=gbps, source=hbm_source), skipped=[])
    print(f"device: {dev_name}, torch {torch.__version__}, moeyard {moeyard.__version__}; "
          f"shapes {','.join(args.shapes)}; routings {','.join(args.routings)} "
          f"(zipf s={args.zipf_s}); reps {reps}; budget {args.budget_s:.0f} s\n"
          f"backend auto picks {auto} for bf16 ({auto_source}); inference floor at HBM "
          f"{fmt(gbps, '.0f') or '?'} GB/s ({hbm_source})", flush=True)
    for i, routing in enumerate(args.routings):
        for name in args.shapes:
            d, f, E, k, T = dims = shapes[name]
            print(f"\n== {name} {routing}: d {d}, f {f}, E {E}, k {k}, T {T}; "
                  f"FFN {ffn_flops(T, d, f, k) / 1e12:.2f} TFLOP fwd", flush=True)
            safe(f"shape {name} {routing}",
                 lambda: run_shape(name, dims, routing, i == 0, args, reps))
            if i == 0 and not args.skip_hf:
                safe(f"HF {name}", lambda: run_hf(name, d, f, E, k, T, args, reps))
            if i == 0 and args.scattermoe:
                safe(f"scattermoe {name}", lambda: run_scattermoe(name, d, f, E, k, T, reps))
            print(f"({name} {routing} done, {time.time() - t0:.0f} s so far)", flush=True)
    META["seconds"] = time.time() - t0
    print_report(ROWS)
    dump(final=True)
    print(f"\nwrote {os.path.join(OUT, 'bench_experts.json')} ({len(ROWS)} rows, "
          f"{META['seconds']:.0f} s{', some skipped' if META['skipped'] else ''})")


if __name__ == "__main__":
    main()
