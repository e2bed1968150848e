"""A whole routing pipeline (router -> route -> plan -> permute -> experts -> unpermute, with the
aux losses) under torch.compile(fullgraph=True), and captured in a CUDA graph."""
import pytest
import torch

import moeyard
from conftest import DEVICES


def moe_layer(x, router_w, expert_w, k, capacity):
    """Switch-style layer with a capacity layout, so the experts are one batched matmul."""
    E, d, _ = expert_w.shape
    logits = x.float() @ router_w.t()
    weights, experts = moeyard.route(logits, k, renormalize=k > 1)
    p = moeyard.plan(experts, E, capacity)
    h = moeyard.permute(x, p).view(E, capacity, d)
    y = torch.bmm(h, expert_w).relu().view(E * capacity, d)
    out = moeyard.unpermute(y, p, weights.to(x.dtype))
    balance, z = moeyard.router_losses(logits, p.counts, k)
    return out, balance, z, p.counts


def _run(fn, x, router_w, expert_w):
    x, router_w, expert_w = (t.detach().clone().requires_grad_() for t in (x, router_w, expert_w))
    out, balance, z, counts = fn(x, router_w, expert_w, 2, 24)
    (out.square().sum() + 1e-2 * balance + 1e-3 * z).backward()
    return out, balance, z, counts, x.grad, router_w.grad, expert_w.grad


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    T, d, E = 64, 16, 4
    x = torch.randn(T, d, device=device)
    router_w = torch.randn(E, d, device=device)
    expert_w = torch.randn(E, d, d, device=device) / d**0.5
    eager = _run(moe_layer, x, router_w, expert_w)
    compiled = torch.compile(moe_layer, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _run(compiled, x, router_w, expert_w)
        got = _run(compiled, torch.randn_like(x), router_w, expert_w)  # no recompile
    got = _run(compiled, x, router_w, expert_w)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_compile_relu_expert_choice_and_balance_ops():
    torch._dynamo.reset()

    def f(logits, bias):
        w, e = moeyard.relu_route(logits, 4)
        p = moeyard.plan(e, 8, 10, "score", w)
        ew, ee, ep = moeyard.expert_choice(torch.softmax(logits, -1), 6)
        _, e2 = moeyard.route(logits, 2, score="sigmoid", bias=bias, n_group=4, topk_group=2)
        seq = moeyard.sequence_balance_loss(torch.sigmoid(logits), e2, 2)
        return w.sum() + ew.sum() + seq, p.token_row, ep.row_source, e2

    logits = torch.randn(32, 8, requires_grad=True)
    bias = torch.zeros(8)
    want = f(logits, bias)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    T, d, E, k = 512, 64, 16, 2
    x = torch.randn(T, d, device="cuda")
    router_w = torch.randn(E, d, device="cuda")

    def step(x):
        weights, experts = moeyard.route(x @ router_w.t(), k, renormalize=True)
        p = moeyard.plan(experts, E, None)
        pc = moeyard.plan(experts, E, 40, "score", weights)
        y = moeyard.unpermute(moeyard.permute(x, p), p, weights)
        return y, p.token_row, pc.token_row, pc.counts

    step(x)  # warm up (allocations, CUB temp sizes) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(static_out, step(x)):
            torch.testing.assert_close(a, b)
