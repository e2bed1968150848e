"""HBM bytes of the grouped GEMM's operand reads under a tile order, by a wave model of the L2
(no GPU needed; the predictions of benchmarks/NOTES.md come from here).

    python benchmarks/l2_model.py [--sms 132] [--l2-mb 50]

Model: the persistent grid runs P tiles at once (one per SM), tile ids in order, so wave w is tiles
w*P .. w*P + P - 1. The tiles of one wave walk K together, so each distinct operand panel (128 rows
x K of A, K x 128 columns of B, or for a weight gradient count x 128 of either operand) that a wave
needs is read from HBM at most once in that wave; it is read from L2 instead when it stayed there
since an earlier wave. The L2 is an LRU over whole panels holding half the chip's L2 (H100: two
25 MB halves, and data that SMs of both halves read is held in both). Outputs (written once) and
the gathered rows' reuse across experts are left out: the order changes neither.

Orders: "column-fastest" (the kernel before: row tile outer, column tile inner) and "grouped" (G
row tiles at a time, columns walked within the group; G from tile_group below, the same formula as
tile_group in csrc/experts/gemm_index.h).
"""
import argparse
import math
from collections import OrderedDict

BM = 128  # rows of a tile panel (kBM = kBN)


def tile_group(fit, P, rows, cols):
    """Row tiles per group for a segment of rows x cols tiles whose panels are `fit` times smaller
    than the L2 share; mirrors tile_group in csrc/experts/gemm_index.h."""
    if cols + math.ceil(P / cols) + 1 <= fit:
        return 1  # all of the segment's B panels stay: column-fastest reads every panel once
    c = fit - 2  # G + ceil(P/G) + 1 <= fit, with ceil(P/G) <= P/G + 1
    disc = c * c - 4.0 * P
    g = int(0.5 * (c + math.sqrt(disc))) if disc >= 0 else int(math.sqrt(P) + 0.5)
    g = max(1, min(g, rows))
    groups = -(-rows // g)
    return -(-rows // groups)  # the same number of groups, evened out


def order(rows, cols, G):
    """(row, col) of local tiles 0 .. rows*cols - 1 in groups of G rows (G = 1: column-fastest)."""
    for local in range(rows * cols):
        group = local // (G * cols)
        first = group * G
        gr = min(G, rows - first)
        within = local - first * cols
        yield first + within % gr, within // gr


def hbm_bytes(segments, P, l2_bytes, grouped, held_bytes=None):
    """segments: [(row_tiles, col_tiles, a_panel_bytes, b_panel_bytes)] in order. G is chosen for
    an L2 share of l2_bytes; the modelled L2 holds held_bytes (default the same)."""
    tiles = []
    for s, (rows, cols, a_bytes, b_bytes) in enumerate(segments):
        G = tile_group(l2_bytes / a_bytes, P, rows, cols) if grouped else 1
        tiles += [((s, "a", r), a_bytes, (s, "b", c), b_bytes) for r, c in order(rows, cols, G)]
    capacity = l2_bytes if held_bytes is None else held_bytes
    lru, held, total = OrderedDict(), 0, 0
    for w in range(0, len(tiles), P):
        need = OrderedDict()
        for a, ab, b, bb in tiles[w:w + P]:
            need[a], need[b] = ab, bb
        for key, nbytes in need.items():
            if key in lru:
                lru.move_to_end(key)
            else:
                total += nbytes
                lru[key] = nbytes
                held += nbytes
            while held > capacity and len(lru) > 1:
                _, old = lru.popitem(last=False)
                held -= old
    return total


def products(T, k, d, f, E, isz=2):
    """The six products of one layer's expert MLP (SwiGLU, weights [E, K, N] row-major), balanced
    routing: (name, flops, segments)."""
    R = T * k
    rows = R // E
    rt = math.ceil(rows / BM)
    N1 = 2 * f

    def rows_gemm(K, ncols):
        return [(rt, math.ceil(ncols / BM), BM * K * isz, BM * K * isz)] * E

    def wgrad(M, N):
        return [(math.ceil(M / BM), math.ceil(N / BM), rows * BM * isz, rows * BM * isz)] * E

    return [
        ("up  x@w1 (fwd)", 2 * R * d * N1, rows_gemm(d, N1)),
        ("down act@w2 (fwd)", 2 * R * f * d, rows_gemm(f, d)),
        ("dact grad@w2^T", 2 * R * d * f, rows_gemm(d, f)),
        ("dx grad_pre@w1^T", 2 * R * N1 * d, rows_gemm(N1, d)),
        ("dW1 x^T grad_pre", 2 * R * d * N1, wgrad(d, N1)),
        ("dW2 act^T grad", 2 * R * f * d, wgrad(f, d)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--l2-mb", type=float, default=50.0)
    ap.add_argument("--held-mb", type=float, default=None,
                    help="L2 the model holds, if not the share G is chosen for (sensitivity)")
    ap.add_argument("--hbm-tbs", type=float, default=3.35)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    l2 = args.l2_mb * 1e6 / 2
    print(f"P = {args.sms} tiles in flight, L2 share {l2 / 1e6:.0f} MB (modelled L2 holds "
          f"{args.held_mb or l2 / 1e6:.0f} MB), HBM {args.hbm_tbs} TB/s, "
          f"bf16 peak {args.peak_tflops} TFLOP/s")
    print("| model | product | GFLOP | G | operand GB col-fastest | grouped | "
          "bound by bytes, TFLOP/s col-fastest | grouped |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in (("mixtral", (8192, 2, 4096, 14336, 8)),
                        ("qwen3moe", (16384, 8, 2048, 768, 128))):
        for prod, flops, segs in products(*shape):
            held = None if args.held_mb is None else args.held_mb * 1e6
            before = hbm_bytes(segs, args.sms, l2, False, held)
            after = hbm_bytes(segs, args.sms, l2, True, held)
            G = tile_group(l2 / segs[0][2], args.sms, segs[0][0], segs[0][1])
            cap = [min(args.peak_tflops, flops / (b / (args.hbm_tbs * 1e12)) / 1e12)
                   for b in (before, after)]
            print(f"| {name} | {prod} | {flops / 1e9:.0f} | {G} | {before / 1e9:.2f} | "
                  f"{after / 1e9:.2f} | {cap[0]:.0f} | {cap[1]:.0f} |")


if __name__ == "__main__":
    main()
