"""The short table that ends benchmarks/gpu_check.py: the key rows of bench_routing.json,
bench_experts.json, bench_layers.json and bench_hf.json in $OUT (or the folder given), and the
expert targets. A missing or partial file prints what it has.

    python benchmarks/summary.py [OUT]
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_experts as bx  # noqa: E402  (labels and the targets rule live there)


def load(out, name):
    path = os.path.join(out, name)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as ex:
        print(f"{name}: not available ({type(ex).__name__})")
        return None


def routing_rows(doc):
    by = {(r["shape"], r["case"]): r for r in doc.get("rows", [])}
    print("\n| routing | shape | eager us | graph us | stock eager / graph us | speed-up |")
    print("|---|---|---|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in doc.get("rows", [])):
        for ours, stock in (("moeyard route + plan", "stock route + plan"),
                            ("moeyard unpermute (bf16, fp32 acc)",
                             "stock combine index_add_ (bf16)")):
            m, s = by.get((shape, ours)), by.get((shape, stock))
            if not m:
                continue
            st = f"{s['ms'] * 1e3:.1f} / {s['graph_ms'] * 1e3:.1f}" if s else ""
            sp = f"{s['ms'] / m['ms']:.1f}x / {s['graph_ms'] / m['graph_ms']:.1f}x" if s else ""
            print(f"| {ours} | {shape} | {m['ms'] * 1e3:.1f} | {m['graph_ms'] * 1e3:.1f} | {st} "
                  f"| {sp} |")


def expert_rows(doc):
    rows = doc.get("rows", [])
    auto = doc.get("auto_backend")
    print(f"(backend auto picks {auto or 'unknown'}: {doc.get('auto_source', '?')}; "
          "(auto) marks its rows)")
    print("\n| experts | shape | routing | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    layers = [bx.labelled(bx.LAYER, b) for b in bx.BACKENDS]
    gemms = [bx.labelled(bx.GMM, b) for b in bx.BACKENDS]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for impl, routing in ([(i, "uniform") for i in layers] + [(i, "zipf") for i in layers] +
                              [(bx.STOCK, "uniform"), (bx.STOCK, "zipf"), (bx.HF_GROUPED, None)] +
                              [(i, None) for i in gemms] + [(bx.TGMM, None), (bx.DENSE, None)]):
            f = bx.find(rows, shape, impl, "fwd", routing)
            b = bx.find(rows, shape, impl, "fwd+bwd", routing)
            if not (f or b):
                continue
            fwd = f"{f['ms']:.3f}" if f else ""
            bwd = f"{b['ms']:.3f} | {bx.fmt(b['tflops'], '.0f')} | {bx.fmt(b['peak_mib'], '.0f')}" \
                if b else " | | "
            mark = " (auto)" if (f or b).get("auto") else ""
            print(f"| {impl}{mark} | {shape} | {(f or b)['routing']} | {fwd} | {bwd} |")
    inference_rows(doc)
    warned = [c for c in doc.get("checks", []) if c.get("warning")]
    if warned:
        print("correctness WARNINGS: " + ", ".join(
            f"{c['shape']} {c['routing']} [{c.get('backend', '?')}]" for c in warned))
    if doc.get("skipped"):
        print("skipped (time budget): " + ", ".join(doc["skipped"]))
    bx.print_targets(rows, auto, "expert targets" + ("" if doc.get("complete") else
                                                     " (run incomplete)"))


def inference_rows(doc):
    """One line per (shape, tokens): each implementation's ms and % of the weight-read floor."""
    rows = [r for r in doc.get("rows", []) if r.get("tokens")]
    if not rows:
        return
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    hbm = doc.get("hbm", {})
    print(f"\ninference, fwd: ms (% of the floor of reading the selected experts once at "
          f"{bx.fmt(hbm.get('gbps'), '.0f') or '?'} GB/s, {hbm.get('source', '?')}; experts read "
          "by the first column's routing, the HF block's by its own router)")
    print("| shape | T | experts read | floor us | " + " | ".join(impls) + " |")
    print("|---|---|---|---|" + "---|" * len(impls))
    for shape, T in dict.fromkeys((r["shape"], r["tokens"]) for r in rows):
        cells = [bx.find(rows, shape, i, bx.infer_mode(T)) for i in impls]
        first = next(r for r in cells if r)
        floor = first["floor_ms"] and first["floor_ms"] * 1e3
        print(f"| {shape} | {T} | {first['experts_read']} | {bx.fmt(floor, '.1f')} | " + " | ".join(
            f"{r['ms']:.3f} ({bx.fmt(r['floor_pct'], '.0f')}%)" if r else "" for r in cells) + " |")


def layer_rows(doc):
    rows = doc.get("rows", [])
    by = {(r["layer"], r["impl"], r["mode"]): r for r in rows}
    print("\n| layer (qwen3moe shape) | moeyard fwd+bwd ms | torch fwd+bwd ms | speed-up | "
          "moeyard / torch peak MiB |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["layer"] for r in rows):
        m, t = by.get((name, "moeyard", "fwd+bwd")), by.get((name, "torch", "fwd+bwd"))
        ms = lambda r: f"{r['ms']:.2f}" if r else ""  # noqa: E731
        sp = f"{t['ms'] / m['ms']:.2f}x" if m and t else ""
        pk = " / ".join(bx.fmt(r and r["peak_mib"], ".0f") for r in (m, t))
        print(f"| {name} | {ms(m)} | {ms(t)} | {sp} | {pk} |")
    warned = [n for n, c in doc.get("checks", {}).items() if c.get("warning")]
    if warned:
        print("correctness WARNINGS: " + ", ".join(warned))


def hf_rows(doc):
    import bench_hf  # its own report table, with the check errors and notes of each row
    m = doc.get("model", {})
    print(f"\nHF Qwen3-MoE-like model ({m.get('num_hidden_layers', '?')} layers, "
          f"{m.get('num_experts', '?')} experts top-{m.get('num_experts_per_tok', '?')}, "
          f"{doc.get('tokens', '?')} tokens)")
    bench_hf.print_report(doc.get("rows", []))
    if not doc.get("complete"):
        print("(hf run incomplete)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.environ.get("OUT", "out")
    print("== summary")
    r = load(out, "bench_routing.json")
    if r:
        routing_rows(r)
    e = load(out, "bench_experts.json")
    if e:
        print(f"\n(experts: {e.get('device', '?')}, torch {e.get('torch', '?')}, "
              f"transformers {e.get('transformers', 'not used')})")
        expert_rows(e)
    la = load(out, "bench_layers.json")
    if la:
        layer_rows(la)
    h = load(out, "bench_hf.json")
    if h:
        print(f"\n(hf: {h.get('device', '?')}, torch {h.get('torch', '?')}, "
              f"transformers {h.get('transformers', '?')}, {h.get('dtype', '?')})")
        hf_rows(h)


if __name__ == "__main__":
    main()
