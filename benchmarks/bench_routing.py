"""Routing benchmark: moeyard route + plan against the stock PyTorch pipeline, same GPU, one run.

Stock pipeline (what a user writes today): softmax -> topk -> renormalize -> stable argsort of the
expert ids -> histc counts (bincount would sync with the host) -> cumsum offsets -> inverse
permutation; stock permute: x[order // k]; stock combine: index_add_ of weighted rows.
Two timings per case, each the median over 30 samples of CUDA-event time per call, a sample being
20 back-to-back calls after warm-up:
  eager  -- calls from Python, launch and host overhead included, as an eager user sees it;
  graph  -- the 20 calls captured once in a CUDA graph and replayed: the GPU time.
Prints a markdown table; writes JSON to $OUT (or .) as bench_routing.json.

    python benchmarks/bench_routing.py
"""
import json
import os

import torch

import moeyard

SHAPES = {  # name: (tokens, experts, k, d_model)
    "qwen3moe": (16384, 128, 8, 2048),
    "mixtral": (8192, 8, 2, 4096),
}


def time_ms(fn, samples=30, calls=20, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(samples):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / calls)
    return sorted(ts)[len(ts) // 2]


def graph_ms(fn, samples=30, calls=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return time_ms(g.replay, samples=samples, calls=1, warmup=3) / calls


def stock_route(logits, k):
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


def stock_plan(idx, E):
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, counts, offsets, inverse


def main():
    dev = "cuda"
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, moeyard {moeyard.__version__}")
    for name, (T, E, k, d) in SHAPES.items():
        torch.manual_seed(0)
        logits = torch.randn(T, E, device=dev)
        x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
        C = moeyard.expert_capacity(T, E, k, 1.25)

        # correctness guard: the two pipelines agree on the routing they benchmark
        w_m, e_m = moeyard.route(logits, k, renormalize=True)
        w_s, e_s = stock_route(logits, k)
        same = (e_m.long().sort(-1).values == e_s.sort(-1).values).all(-1).float().mean().item()
        assert same > 0.999, f"routings differ on {1 - same:.2%} of tokens"  # only fp near-ties
        p = moeyard.plan(e_m, E)
        order, counts, _, _ = stock_plan(e_s, E)

        def m_route_plan():
            w, e = moeyard.route(logits, k, renormalize=True)
            return moeyard.plan(e, E)

        def m_route_plan_cap():
            w, e = moeyard.route(logits, k, renormalize=True)
            return moeyard.plan(e, E, C, "score", w)

        def s_route_plan():
            w, idx = stock_route(logits, k)
            return stock_plan(idx, E)

        y = moeyard.permute(x, p)
        tok = order // k
        wflat = w_s.flatten()[order].to(x.dtype)

        def s_combine():
            out = torch.zeros_like(x)
            return out.index_add_(0, tok, y * wflat[:, None])

        cases = [
            ("stock route (softmax, topk, renorm)", lambda: stock_route(logits, k)),
            ("moeyard route", lambda: moeyard.route(logits, k, renormalize=True)),
            ("stock plan (argsort, histc, cumsum, inverse)", lambda: stock_plan(e_s, E)),
            ("moeyard plan (dropless)", lambda: moeyard.plan(e_m, E)),
            ("stock route + plan", s_route_plan),
            ("moeyard route + plan", m_route_plan),
            (f"moeyard route + plan, capacity {C}, score priority", m_route_plan_cap),
            ("stock permute x[order // k] (bf16)", lambda: x[tok]),
            ("moeyard permute (bf16)", lambda: moeyard.permute(x, p)),
            ("stock combine index_add_ (bf16)", s_combine),
            ("moeyard unpermute (bf16, fp32 acc)", lambda: moeyard.unpermute(y, p, w_m)),
        ]
        for label, fn in cases:
            ms, gms = time_ms(fn), graph_ms(fn)
            rows.append(dict(shape=name, case=label, ms=ms, graph_ms=gms))
            print(f"{name:9s} {label:55s} eager {ms * 1e3:8.1f} us  graph {gms * 1e3:8.1f} us",
                  flush=True)
    by = {(r["shape"], r["case"]): r for r in rows}
    print("\n| shape | case | eager us | graph us | speed-up vs stock (eager / graph) |")
    print("|---|---|---|---|---|")
    pairs = {"moeyard route": "stock route (softmax, topk, renorm)",
             "moeyard plan (dropless)": "stock plan (argsort, histc, cumsum, inverse)",
             "moeyard route + plan": "stock route + plan",
             "moeyard permute (bf16)": "stock permute x[order // k] (bf16)",
             "moeyard unpermute (bf16, fp32 acc)": "stock combine index_add_ (bf16)"}
    for r in rows:
        b = by.get((r["shape"], pairs.get(r["case"])))
        sp = f"{b['ms'] / r['ms']:.1f}x / {b['graph_ms'] / r['graph_ms']:.1f}x" if b else ""
        print(f"| {r['shape']} | {r['case']} | {r['ms'] * 1e3:.1f} | {r['graph_ms'] * 1e3:.1f} | {sp} |")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_routing.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
