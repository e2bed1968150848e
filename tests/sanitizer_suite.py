"""Every CUDA op once on small inputs, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python tests/sanitizer_suite.py

Not a pytest module: the sanitizer wraps the whole process. Exits non-zero if an op fails."""
import torch

import moeyard

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
torch.cuda.synchronize()
print("sanitizer suite: all ops ran")
