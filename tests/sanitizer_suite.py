"""Every CUDA op once on small inputs, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python tests/sanitizer_suite.py [experts]

`experts` runs the routing the expert ops need and the expert compute only (both backends): the
small suite of benchmarks/gpu_check.py, which has to fit a short GPU lease.
Not a pytest module: the sanitizer wraps the whole process. Exits non-zero if an op fails."""
import sys

import torch

import moeyard

experts_only = sys.argv[1:] == ["experts"]

dev = "cuda"
torch.manual_seed(0)
T, E, k, d = 300, 64, 4, 40
logits = torch.randn(T, E, device=dev)
bias = 0.1 * torch.randn(E, device=dev)
w, e = moeyard.route(logits, k, "sigmoid", bias=bias, n_group=8, topk_group=4, renormalize=True)
moeyard.route(logits.bfloat16(), k, topk_before_score=True)
rw, re = moeyard.relu_route(logits, 6)
x = torch.randn(T, d, device=dev, requires_grad=True)
for cap, policy, ex, wt in [(None, "position", e, w), (7, "position", e, w), (5, "score", re, rw)]:
    p = moeyard.plan(ex, E, cap, policy, wt)
    wt = wt.clone().requires_grad_()
    y = moeyard.unpermute(moeyard.permute(x, p) * 2, p, wt)
    y.sum().backward()
ew, ee, ep = moeyard.expert_choice(torch.softmax(logits, -1), 9)
moeyard.update_expert_bias(bias, ep.counts, 1e-3)
moeyard.router_losses(logits, ep.counts, k)
moeyard.sequence_balance_loss(torch.sigmoid(logits), e, 3)

# expert compute: grouped_mm (plain, gathered through a plan, capacity; both weight orders) and
# expert_ffn (dropless and capacity, with biases), forward and backward, odd sizes, bf16.
I = 24
xb = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
for cap in (None, 7):
    p = moeyard.plan(e, E, cap)
    src = torch.where(p.row_source >= 0, p.row_source // k, -1).to(torch.int32)
    for b in (torch.randn(E, d, 2 * I + 3, device=dev, dtype=torch.bfloat16),
              torch.randn(E, 2 * I + 3, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)):
        b.requires_grad_()
        y = moeyard.grouped_mm(xb, b, p.offsets, src, cap, backend="moeyard")
        y = y + moeyard.grouped_mm(moeyard.permute(xb, p), b, p.offsets, None, cap,
                                   backend="moeyard")
        y.float().sum().backward()
    for act, layout in (("swiglu", "linear"), ("gelu", "matmul")):
        n1 = 2 * I if act == "swiglu" else I
        gu = torch.randn(E, n1, d) if layout == "linear" else torch.randn(E, d, n1)
        dn = torch.randn(E, d, I) if layout == "linear" else torch.randn(E, I, d)
        params = [t.to(dev, torch.bfloat16).requires_grad_() for t in
                  (gu / d**0.5, dn / I**0.5, torch.randn(E, n1), torch.randn(E, d))]
        wt = w.clone().requires_grad_()
        out = moeyard.expert_ffn(xb, p, wt, *params, act, layout, backend="moeyard")
        out.float().square().sum().backward()

# the grouped_mm backend (torch's grouped GEMM / bmm around moeyard's gather, activation and
# combine): aligned bf16 widths, dropless and capacity, both layouts, biases, forward and backward
xa = torch.randn(T, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
for cap in (None, 7):
    p = moeyard.plan(e, E, cap)
    for act, layout in (("swiglu", "linear"), ("swiglu_oss", "matmul"), ("gelu", "linear")):
        n1 = 64 if act != "gelu" else 32
        gu = torch.randn(E, n1, 64) if layout == "linear" else torch.randn(E, 64, n1)
        dn = torch.randn(E, 64, 32) if layout == "linear" else torch.randn(E, 32, 64)
        params = [t.to(dev, torch.bfloat16).requires_grad_() for t in
                  (gu / 8, dn / 6, torch.randn(E, n1), torch.randn(E, 64))]
        wt = w.clone().requires_grad_()
        out = moeyard.expert_ffn(xa, p, wt, *params, act, layout, backend="grouped_mm")
        out.float().square().sum().backward()
    src = torch.where(p.row_source >= 0, p.row_source // k, -1).to(torch.int32)
    b = torch.randn(E, 48, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    moeyard.grouped_mm(xa, b, p.offsets, src, cap, backend="grouped_mm").float().sum().backward()

if experts_only:
    torch.cuda.synchronize()
    print("sanitizer suite (experts): all ops ran")
    sys.exit(0)

# dynamic top-p routing: bounded and unbounded, fp32 with its backward and bf16
pw, pe = moeyard.top_p_route(logits.clone().requires_grad_(), 0.5, 7)
pw.sum().backward()
moeyard.top_p_route(logits.bfloat16(), 1.0)
# sparsemixer (GRIN / PhiMoE): eval and training (drawn noise), forward and backward, E at the
# smallest, a middle and the largest register tier, fp32 and bf16.
for Es in (2, 64, 1000):
    for dt in (torch.float32, torch.bfloat16):
        zs = (4 + torch.randn(T, Es, device=dev)).to(dt).requires_grad_()
        for training in (False, True):
            moeyard.sparsemixer(zs, 0.1, training)[0].sum().backward()

# SMEAR: merged_linear in bf16 (both weight memory orders, with a bias) and fp32, forward and
# backward, in one chunk and one example per chunk (budget 0), and a SmearMoE layer.
Bm, Sm, K, N, Em = 5, 7, 40, 24, 6
probs = torch.softmax(torch.randn(Bm, Em, device=dev), -1).requires_grad_()
for dt in (torch.bfloat16, torch.float32):
    xm = torch.randn(Bm, Sm, K, device=dev, dtype=dt, requires_grad=True)
    bm = torch.randn(Em, N, device=dev, dtype=dt, requires_grad=True)
    for wm in (torch.randn(Em, N, K, device=dev, dtype=dt),
               torch.randn(Em, K, N, device=dev, dtype=dt).transpose(1, 2)):
        wm.requires_grad_()
        for budget in (256 << 20, 0):
            old = moeyard.ops._set_merge_budget(budget)
            moeyard.merged_linear(xm, probs, wm, bm).float().square().sum().backward()
            moeyard.ops._set_merge_budget(old)
smear = moeyard.SmearMoE(d, 16, 4, activation="silu", expert_bias=True).to(dev)
mask = torch.arange(12, device=dev) < torch.tensor([[12], [5], [0]], device=dev)
smear(torch.randn(3, 12, d, device=dev), attention_mask=mask).square().sum().backward()

# BASE: balanced assignment (one-block auction: radix select, greedy completion after a round
# cap, equal scores, T < E) and the layer, forward and backward.
for scores, cap in [(torch.randn(T, 8, device=dev), None), (torch.randn(257, 64, device=dev), None),
                    (torch.randint(0, 3, (120, 8), device=dev).float(), 5),
                    (torch.zeros(9, 4, device=dev), None), (torch.randn(5, 40, device=dev), None)]:
    moeyard.balanced_assignment(scores) if cap is None else moeyard.balanced_assignment(scores, cap)
base = moeyard.BaseMoE(d, I, 8).to(dev)
base(x).sum().backward()
base.eval()(x)
torch.cuda.synchronize()
print("sanitizer suite: all ops ran")
