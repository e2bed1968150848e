"""Layer benchmark: every moeyard MoE layer against the same layer written in plain PyTorch, on the
same weights, same GPU, one run (issue 4). bf16 weights and activations, fp32 router math, training
mode (capacities, losses and controllers' bookkeeping as in training).

Shape: qwen3moe, d_model 2048, d_ff 768 per expert, 128 experts, T = 16384 tokens (8 x 2048).
Layers, each configured to route about 8 experts' worth of rows per token where it can:
  topk      TopKMoE.qwen3_moe(k=8, renormalize=True): softmax, top-8, dropless, balance loss
  deepseek  TopKMoE.deepseek_v3(k=8): sigmoid + selection bias, best 4 of 8 groups, scale 2.5,
            the sequence-wise balance loss (alpha 1e-4), a shared SwiGLU expert of width d_ff
  switch    SwitchMoE: top-1, capacity factor 1.25 (drops by position), ReLU experts, balance and
            z losses (no jitter, so both sides route the same tokens)
  remoe     ReMoE(k=8, k_max=8): ReLU gates, the 8 largest positive kept, L1 term; at
            initialisation about half the gates are positive, so k_max = 8 bounds every token to
            8 experts, ReMoE's steady state
  ec        ExpertChoiceMoE(capacity_factor=8): each expert takes its top C = 8 T / E tokens
  base      BaseMoE(activation="swiglu", expert_bias=False): balanced assignment (T / E tokens
            per expert), k = 1, experts of width 8 d_ff so the FLOPs match the others
  smear     SmearMoE(expert_dropout=0): experts of width 8 d_ff merged per sequence (routed on
            its mean), one merged MLP per sequence
The plain-PyTorch side is what a careful user writes without moeyard: the routing with torch ops
(no host sync: histc counts, cumsum positions), the experts as two torch._grouped_mm products over
the expert-sorted rows (ec: gathered [E, C, d] blocks and two bmm), combine by index_add in fp32;
base: fairseq's auction (ALGORITHMS.md 2.3) in torch ops, which checks for the end on the host each
round, as fairseq does; smear: the merge as einsum over the experts, then two bmm (ALGORITHMS.md
3.3). The base comparison uses moeyard's assignment on both sides (the two auctions may break ties
differently); the timed plain side runs its own auction.
Before timing each layer, its loss and the gradients of x, the router and the expert weights are
compared
(relative Frobenius error; a WARNING line if above 2e-2).

Columns: ms = median of CUDA-event timings of single calls after warm-up (fwd under no_grad;
fwd+bwd with loss out.float().pow(2).mean() + the layer's aux losses); peak MiB (fwd+bwd) = peak
allocated during one step above what was allocated before it, .grad reset first. JSON to
$OUT/bench_layers.json (OUT default "out"). --cpu-smoke runs the plumbing (and the comparison) on
CPU at a tiny shape; the test suite runs it.

    python benchmarks/bench_layers.py [--layers topk,switch] [--quick] [--cpu-smoke]
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_experts as bx  # noqa: E402  (timing, peak memory and error capture live there)

SHAPE = (2048, 768, 128, 8, 16384)  # d, f, E, k, T: qwen3moe
SMOKE_SHAPE = (32, 16, 8, 2, 64)
SEQ = 2048  # the T tokens as [T // SEQ, SEQ, d]
TOL = 2e-2
# SMEAR's router gradient sums terms that cancel; in bf16 it is good to ~10% of its size, the same
# for moeyard and for a plain bf16 einsum (tests/test_layers_smear.py checks it in fp32 exactly)
TOL_OVERRIDES = {("smear", "grad_router"): 0.15}
OUT = os.environ.get("OUT", "out")
ROWS = []
META = {}


# ------------------------------------------------------------------- the moeyard layers


def make_layer(name, d, f, E, k):
    import moeyard
    if name == "topk":
        return moeyard.TopKMoE.qwen3_moe(d, f, num_experts=E, k=k, renormalize=True)
    if name == "deepseek":
        groups = min(8, E // 2)
        return moeyard.TopKMoE.deepseek_v3(d, f, num_experts=E, k=k, n_group=groups,
                                           topk_group=groups // 2)
    if name == "switch":
        return moeyard.SwitchMoE(d, f, E, jitter_eps=0.0)
    if name == "remoe":
        return moeyard.ReMoE(d, f, E, k=k, k_max=k)
    if name == "ec":
        return moeyard.ExpertChoiceMoE(d, f, E, capacity_factor=float(k))
    if name == "base":
        return moeyard.BaseMoE(d, k * f, E, activation="swiglu", expert_bias=False)
    if name == "smear":  # one merged MLP per sequence, as wide as the k experts of the others
        return moeyard.SmearMoE(d, k * f, E, expert_dropout=0.0)
    raise KeyError(name)


LAYERS = ("topk", "deepseek", "switch", "remoe", "ec", "base", "smear")


# -------------------------------------------------------------- the plain-PyTorch layers


def torch_experts(h, tok, e, w, ex):
    """sum over assignments (tok, e, w) of w * FFN_e(h[tok]) as two torch._grouped_mm products;
    assignments with e outside [0, E) (dropped, inactive) contribute nothing."""
    from moeyard.reference import activation
    E = ex.num_experts
    valid = (e >= 0) & (e < E)
    key = torch.where(valid, e, E)  # invalid rows sort last, past the final offset
    order = key.argsort(stable=True)
    tok, w, valid = tok[order], w[order], valid[order]
    offs = torch.histc(key.float(), bins=E, min=0, max=E - 1).cumsum(0).to(torch.int32)
    # rows past the last offset are left undefined by _grouped_mm, forward and backward: mask both
    rows = torch.where(valid[:, None], h[tok], 0.0)
    a = torch._grouped_mm(rows, ex.gate_up_proj.transpose(1, 2), offs=offs)
    a = activation(a.float(), ex.activation).to(h.dtype)
    y = torch._grouped_mm(a, ex.down_proj.transpose(1, 2), offs=offs)
    y = torch.where(valid[:, None], y.float(), 0.0) * w[:, None].float()  # mask before the product
    return torch.zeros(h.shape, dtype=torch.float32, device=h.device).index_add(0, tok, y)


def scores_for_loss(logits, sigmoid):
    """The balance losses' per-token scores: softmax, or the sigmoid normalized per token."""
    if not sigmoid:
        return torch.softmax(logits, -1)
    s = torch.sigmoid(logits)
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def balance_loss(logits, e, E, sigmoid=False):
    """Switch load-balancing loss E * sum_e f_e P_e (f: share of the T k assignments, pre-drop)."""
    f = torch.histc(e.float(), bins=E, min=0, max=E - 1) / e.numel()
    return E * (f * scores_for_loss(logits, sigmoid).mean(0)).sum()


def sequence_balance_loss(logits, k, sequences, sigmoid):
    """DeepSeek-V3's sequence-wise loss without alpha: per sequence of S tokens f_e = E / (k S)
    times the tokens whose plain top-k has e, P_e the mean normalized score; mean over them."""
    T, E = logits.shape
    S = T // sequences
    top = logits.topk(k, dim=-1).indices.view(sequences, S * k)
    f = F.one_hot(top, E).sum(1).float() * (E / (k * S))
    P = scores_for_loss(logits, sigmoid).view(sequences, S, E).mean(1)
    return (f * P).sum(-1).mean()


def torch_topk(layer, x):
    h = x.reshape(-1, x.shape[-1])
    r, E, k = layer.router, layer.num_experts, layer.k
    logits = F.linear(h.float(), r.weight.float())
    s = torch.softmax(logits, -1) if r.score == "softmax" else torch.sigmoid(logits)
    sel = s if r.e_score_correction_bias is None else s + r.e_score_correction_bias
    T = h.shape[0]
    if r.n_group > 1:
        group = sel.view(T, r.n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group, dtype=torch.bool)
        keep.scatter_(1, group.topk(r.topk_group, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // r.n_group, dim=1), float("-inf"))
    e = chosen = sel.topk(k, dim=-1).indices
    w = s.gather(1, e)
    if r.renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * r.scale
    cap = layer.capacity(T)
    if cap is not None:  # position priority: all first choices, then all second choices, ...
        onehot = F.one_hot(e.t().reshape(-1), E)  # slot-major order
        pos = (onehot.cumsum(0) * onehot).sum(-1).view(k, T).t() - 1
        e = torch.where(pos < cap, e, -1)
    tok = torch.arange(T, device=h.device).repeat_interleave(k)
    out = torch_experts(h, tok, e.reshape(-1), w.reshape(-1), layer.experts)
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(h).float()
    losses = []
    sigmoid = r.score == "sigmoid"
    if layer.aux_loss_coef > 0:
        losses.append(layer.aux_loss_coef * balance_loss(logits, chosen, E, sigmoid))
    if layer.seq_aux_loss_coef > 0:
        sequences = x.shape[0] if x.dim() == 3 else 1
        losses.append(layer.seq_aux_loss_coef * sequence_balance_loss(logits, k, sequences,
                                                                      sigmoid))
    if layer.z_loss_coef > 0:
        losses.append(layer.z_loss_coef * (torch.logsumexp(logits, -1) ** 2).mean())
    return out.to(h.dtype), losses


def torch_remoe(layer, x):
    h = x.reshape(-1, x.shape[-1])
    E, T = layer.num_experts, h.shape[0]
    logits = F.linear(h.float(), layer.router.weight.float())
    gates, e = F.relu(logits).topk(layer.router.k_max, dim=-1)
    e = torch.where(gates > 0, e, -1)
    tok = torch.arange(T, device=h.device).repeat_interleave(e.shape[1])
    out = torch_experts(h, tok, e.reshape(-1), gates.reshape(-1), layer.experts)
    counts = torch.histc(e.float(), bins=E, min=0, max=E - 1)
    f = counts * (E / (layer.k * T))
    l1 = layer.l1_reg_coeff * (f * F.relu(logits).sum(0)).sum() / T
    return out.to(h.dtype), [l1]


def torch_ec(layer, x):
    h = x.reshape(-1, x.shape[-1])
    from moeyard.reference import activation
    ex, T = layer.experts, h.shape[0]
    scores = torch.softmax(F.linear(h.float(), layer.router.weight.float()), -1)
    w, tok = scores.t().topk(layer.capacity(T), dim=-1)  # [E, C]
    a = torch.bmm(h[tok], ex.gate_up_proj.transpose(1, 2))
    a = activation(a.float(), ex.activation).to(h.dtype)
    y = torch.bmm(a, ex.down_proj.transpose(1, 2)).float() * w[..., None]
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    return out.index_add(0, tok.reshape(-1), y.reshape(-1, h.shape[1])).to(h.dtype), []


def fairseq_auction(scores):
    """experts [T] (int64) of fairseq's balanced assignment (ALGORITHMS.md 2.3) in torch ops: the
    experts bid for their top T/E tokens until every token has exactly one bidder; E | T."""
    S = scores.t()
    E, T = S.shape
    m = T // E
    eps = max((scores.max() - scores.min()).item() / 50, 1e-4)
    top = S.max()
    value, cost = S.clone(), torch.zeros(T, device=S.device)
    prev, it = None, 0
    while True:
        top_v, top_i = value.topk(m + 1, dim=1)
        bids = torch.zeros(E, T, device=S.device)
        bids.scatter_(1, top_i[:, :m], top_v[:, :m] - top_v[:, m:] + eps)
        if prev is not None and 0 < it < 100:
            bids[prev] = eps
        high, winner = bids.max(dim=0)
        if bool((high > 0).all()):  # the host check of every round
            break
        cost += high
        value = S - cost
        tok = (high > 0).nonzero().squeeze(1)
        prev = (winner[tok], tok)
        value[prev] = top if it < 100 else S[prev]
        it += 1
    experts = torch.empty(T, dtype=torch.int64, device=S.device)
    experts[top_i[:, :m].reshape(-1)] = torch.arange(E, device=S.device).repeat_interleave(m)
    return experts


def torch_base(layer, x, experts=None):
    """BASE with fairseq's auction (or the given experts [T]): x -> alpha * FFN_e(LN_e(x))."""
    h = x.reshape(-1, x.shape[-1])
    logits = F.linear(h.float(), layer.expert_centroids.float())
    if experts is None:
        experts = fairseq_auction(logits.detach())
    alpha = torch.sigmoid(logits.gather(1, experts[:, None]))[:, 0]
    z = F.layer_norm(h, (h.shape[1],), eps=layer.norm_eps)
    z = z * layer.norm_weight[experts] + layer.norm_bias[experts]
    tok = torch.arange(h.shape[0], device=h.device)
    return torch_experts(z, tok, experts, alpha, layer.experts).to(h.dtype), []


def torch_smear(layer, x):
    """SMEAR: per-sequence probabilities (the router is plain PyTorch), experts merged by einsum."""
    from moeyard.reference import activation
    ex = layer.experts
    xb = x.view(-1, x.shape[-2], x.shape[-1])
    probs = layer.router(xb).to(x.dtype)
    w1 = torch.einsum("be,end->bnd", probs, ex.gate_up_proj)
    w2 = torch.einsum("be,edi->bdi", probs, ex.down_proj)
    a = activation(torch.bmm(xb, w1.transpose(1, 2)).float(), ex.activation).to(x.dtype)
    return torch.bmm(a, w2.transpose(1, 2)).reshape(-1, x.shape[-1]), []


TORCH_LAYERS = {"topk": torch_topk, "deepseek": torch_topk, "switch": torch_topk,
                "remoe": torch_remoe, "ec": torch_ec, "base": torch_base, "smear": torch_smear}


# --------------------------------------------------------------------------------- runner


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def moeyard_loss(layer, x):
    out = layer(x)
    aux = sum(layer.aux_losses.values(), torch.zeros((), device=x.device))
    return out.float().pow(2).mean() + aux


def torch_loss(name):
    def loss(layer, x):
        out, losses = TORCH_LAYERS[name](layer, x)
        return out.float().pow(2).mean() + sum(losses, torch.zeros((), device=x.device))
    return loss


def compare(name, layer, x):
    """Loss (output term + aux losses) and its gradients (x, router, gate_up, down) of the two
    implementations: relative errors."""
    router = layer.expert_centroids if name == "base" else layer.router.weight
    params = [x, router, layer.experts.gate_up_proj, layer.experts.down_proj]
    loss_m = moeyard_loss(layer, x)
    g_m = torch.autograd.grad(loss_m, params)
    if name == "base":  # both sides on moeyard's assignment: the auctions may break ties apart
        import moeyard
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), layer.expert_centroids.float())
        experts = moeyard.balanced_assignment(logits.detach())[:, 0].long()
        out, _ = torch_base(layer, x, experts)
        loss_t = out.float().pow(2).mean()
    else:
        loss_t = torch_loss(name)(layer, x)
    g_t = torch.autograd.grad(loss_t, params)
    errs = {"loss": rel_err(loss_m, loss_t)}
    names = ("x", "router", "gate_up", "down")
    errs.update({f"grad_{n}": rel_err(a, b) for n, a, b in zip(names, g_m, g_t)})
    return errs


def record(name, impl, mode, ms, peak=None, note=""):
    ROWS.append(dict(layer=name, impl=impl, mode=mode, ms=ms, peak_mib=peak, note=note))
    pk = f"{peak:8.0f} MiB" if peak is not None else " " * 12
    print(f"{name:9s} {impl:8s} {mode:8s} {ms:10.3f} ms {pk}  {note}", flush=True)
    dump()


def dump(final=False):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "bench_layers.json"), "w") as fh:
        json.dump(dict(META, rows=ROWS, complete=final), fh, indent=1)


def run_layer(name, shape, reps):
    d, f, E, k, T = shape
    torch.manual_seed(0)
    layer = make_layer(name, d, f, E, k).to(device=bx.DEV, dtype=torch.bfloat16).train()
    if name == "base":  # zero at init (down_proj = 0) would make the comparison vacuous
        with torch.no_grad():
            layer.experts.down_proj.normal_(std=0.02)
    S = min(SEQ, T)
    x = torch.randn(T // S, S, d, device=bx.DEV, dtype=torch.bfloat16).requires_grad_(True)
    params = [x] + list(layer.parameters())

    errs = compare(name, layer, x)
    bad = {n: v for n, v in errs.items() if not v <= TOL_OVERRIDES.get((name, n), TOL)}
    note = "rel. err vs torch: " + ", ".join(f"{n} {v:.1e}" for n, v in errs.items())
    print(f"check {name}: {note}", flush=True)
    if bad:
        print(f"WARNING {name}: moeyard and plain PyTorch differ by more than {TOL:.0e}: {bad}",
              flush=True)
    META.setdefault("checks", {})[name] = dict(errs, warning=bool(bad))
    bx.clear_grads(params)

    w, r = reps
    for impl, loss in (("moeyard", moeyard_loss), ("torch", torch_loss(name))):
        def fwd(loss=loss):
            with torch.no_grad():
                loss(layer, x)

        def step(loss=loss):
            loss(layer, x).backward()

        record(name, impl, "fwd", bx.bench(fwd, w, r))
        ms = bx.bench(step, w, r)
        record(name, impl, "fwd+bwd", ms, bx.peak_extra_mib(step, params))
        bx.clear_grads(params)


def print_report():
    print("\n| layer | moeyard fwd ms | torch fwd ms | moeyard fwd+bwd ms | torch fwd+bwd ms | "
          "speed-up fwd+bwd | moeyard peak MiB | torch peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["layer"], r["impl"], r["mode"]): r for r in ROWS}
    for name in dict.fromkeys(r["layer"] for r in ROWS):
        cells = []
        for impl, mode in (("moeyard", "fwd"), ("torch", "fwd"), ("moeyard", "fwd+bwd"),
                           ("torch", "fwd+bwd")):
            row = by.get((name, impl, mode))
            cells.append(f"{row['ms']:.2f}" if row else "")
        m, t = by.get((name, "moeyard", "fwd+bwd")), by.get((name, "torch", "fwd+bwd"))
        cells.append(f"{t['ms'] / m['ms']:.2f}x" if m and t else "")
        for row in (m, t):
            cells.append(bx.fmt(row and row["peak_mib"], ".0f"))
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset")
    ap.add_argument("--quick", action="store_true", help="fewer warm-up calls and repetitions")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shape on CPU: the plumbing and the comparison, numbers meaningless")
    args = ap.parse_args(argv)
    names = [n for n in args.layers.split(",") if n]
    for n in names:
        if n not in LAYERS:
            ap.error(f"unknown layer {n!r} (known: {', '.join(LAYERS)})")
    if args.cpu_smoke:
        bx.DEV, shape, reps = "cpu", SMOKE_SHAPE, (1, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_layers.py needs a GPU (--cpu-smoke runs its plumbing on CPU)")
        shape, reps = SHAPE, ((1, 3) if args.quick else (3, 10))
    import moeyard
    dev = torch.cuda.get_device_name() if bx.DEV == "cuda" else "cpu"
    META.update(device=dev, torch=torch.__version__, moeyard=moeyard.__version__, shape=shape,
                reps=reps, date=time.strftime("%Y-%m-%d"))
    print(f"device {dev}, torch {torch.__version__}; d, f, E, k, T = {shape}", flush=True)
    for name in names:
        bx.safe(f"layer {name}", lambda: run_layer(name, shape, reps), "bench_layers_errors.txt")
    print_report()
    dump(final=True)
    return 1 if any(c["warning"] for c in META.get("checks", {}).values()) else 0


if __name__ == "__main__":
    sys.exit(main())
