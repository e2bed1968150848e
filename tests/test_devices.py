"""Every op, its tensors on mixed devices: refused with the two tensors and their devices named, on
every dispatch path (a meta tensor among CPU ones reaches the fake kernel, a CPU tensor among CUDA
ones the CUDA kernel); all tensors on meta still propagate shapes like the real kernels."""
import pytest
import torch

import moeyard

_ops = torch.ops.moeyard


def _routing():
    """A small routing and its plan: T = 3 tokens, k = 2, E = 3 experts, 6 rows."""
    experts = torch.tensor([[0, 1], [1, 2], [2, 0]], dtype=torch.int32)
    return experts, moeyard.plan(experts, 3)


def _ffn_args():
    """expert_ffn's arguments up to the activation: x [3,4], the plan, weights [3,2],
    w1 [E=3, H=4, N1=4], w2 [3, I=2, 4] (logical), b1 [3,4], b2 [3,4]."""
    _, p = _routing()
    return (torch.randn(3, 4), p.row_source, p.token_row, p.offsets, None, torch.rand(3, 2),
            torch.randn(3, 4, 4), torch.randn(3, 2, 4), torch.randn(3, 4), torch.randn(3, 4))


def _op_args():
    """name -> (op, arguments on the CPU): every moeyard op that takes a tensor."""
    experts, p = _routing()
    rs, tr, w = p.row_source, p.token_row, torch.rand(3, 2)
    a, b, a_index = torch.randn(6, 4), torch.randn(3, 4, 5), torch.arange(6, dtype=torch.int32)
    ffn = _ffn_args()
    x3, probs, weight, bias = torch.randn(2, 3, 4), torch.rand(2, 3), torch.randn(3, 5, 4), \
        torch.randn(3, 5)
    return {
        "route": (_ops.route, (torch.randn(3, 3), 2, "softmax", False, torch.zeros(3), 1, 1,
                               False, 1.0)),
        "relu_route": (_ops.relu_route, (torch.randn(3, 3), 2)),
        "top_p_route": (_ops.top_p_route, (torch.randn(3, 3), 0.5, 2)),
        "sparsemixer": (_ops.sparsemixer, (torch.randn(3, 3), 0.01, torch.rand(3, 2, 4))),
        "_sparsemixer_backward": (_ops._sparsemixer_backward,
                                  (torch.randn(3, 2), torch.randn(3, 3), experts, 0.01)),
        "plan": (_ops.plan, (experts, 3, 2, "score", w)),
        "plan-position": (_ops.plan, (experts, 3, None, "position", w)),  # weights unused
        "expert_choice": (_ops.expert_choice, (torch.rand(3, 3), 2)),
        "balanced_assignment": (_ops.balanced_assignment, (torch.randn(3, 3), 100)),
        "update_expert_bias": (_ops.update_expert_bias,
                               (torch.zeros(3), torch.tensor([3, 1, 2], dtype=torch.int32), 0.1)),
        "router_losses": (_ops.router_losses, (torch.randn(3, 3), p.counts, 2)),
        "sequence_balance_loss": (_ops.sequence_balance_loss,
                                  (torch.rand(4, 3), experts[[0, 1, 2, 0]], 2)),
        "permute": (_ops.permute, (torch.randn(3, 4), rs, tr)),
        "unpermute": (_ops.unpermute, (torch.randn(6, 4), rs, tr, w)),
        "unpermute_backward": (_ops.unpermute_backward,
                               (torch.randn(3, 4), torch.randn(6, 4), rs, tr, w, True)),
        "grouped_mm": (_ops.grouped_mm, (a, b, p.offsets, a_index, None)),
        "grouped_mm_backward": (_ops.grouped_mm_backward,
                                (torch.randn(6, 5), a, b, p.offsets, a_index, None, True, True)),
        "expert_ffn": (_ops.expert_ffn, ffn + ("swiglu",)),
        "_expert_ffn_forward": (_ops._expert_ffn_forward, ffn + ("swiglu",)),
        "_expert_ffn_backward": (_ops._expert_ffn_backward,
                                 (torch.randn(3, 4),) + ffn + ("swiglu", torch.randn(6, 4),
                                                                [True] * 6)),
        "merged_linear": (_ops.merged_linear, (x3, probs, weight, bias)),
        "_merged_linear_backward": (_ops._merged_linear_backward,
                                    (torch.randn(2, 3, 5), x3, probs, weight, bias, [True] * 4)),
    }


def _tensor_positions(args):
    return [i for i, v in enumerate(args) if isinstance(v, torch.Tensor)]


def _moved(args, to, only=None):
    """args with the tensor at position `only` (every tensor if None) moved to device `to`."""
    return tuple(v.to(to) if isinstance(v, torch.Tensor) and only in (None, i) else v
                 for i, v in enumerate(args))


# (op name, position of the tensor to move) for every op with two tensors or more
MIXED = [pytest.param(name, i, id=f"{name}-{i}")
         for name, (_, args) in _op_args().items() for i in _tensor_positions(args)
         if len(_tensor_positions(args)) > 1]


def _assert_refused(fn, devices):
    with pytest.raises(RuntimeError, match="must be on the same device") as info:
        fn()
    for d in devices:
        assert f"({d}" in str(info.value)


def test_every_op_is_covered():
    """The table lists every moeyard op with a tensor argument."""
    names = [n.removeprefix("moeyard::") for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("moeyard::")]
    with_tensors = {n for n in names
                    if any("Tensor" in str(a.type) for a in getattr(_ops, n).default._schema.arguments)}
    assert with_tensors == {name.split("-")[0] for name in _op_args()}


@pytest.mark.parametrize("name,position", MIXED)
def test_one_meta_tensor_among_cpu_ones_is_refused(name, position):
    """The fake (meta) kernel runs: it checks the devices before it makes up outputs."""
    op, args = _op_args()[name]
    _assert_refused(lambda: op(*_moved(args, "meta", position)), ("cpu", "meta"))


@pytest.mark.parametrize("name,position", MIXED)
def test_cpu_kernels_refuse_a_tensor_elsewhere(name, position):
    """The C++ checks of the eager path, without a GPU: the CPU kernel itself, called with one
    argument on meta (as the CUDA kernel is called with one on the CPU), refuses it."""
    op, args = _op_args()[name]
    cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    _assert_refused(lambda: op.default.redispatch(cpu_kernel, *_moved(args, "meta", position)),
                    ("cpu", "meta"))


@pytest.mark.parametrize("name", list(_op_args()))
def test_all_meta_propagates_shapes(name):
    op, args = _op_args()[name]
    want = op(*args)
    got = op(*_moved(args, "meta"))
    if name == "update_expert_bias":  # in place, returns nothing
        assert got is None and want is None
        return
    want, got = (o if isinstance(o, tuple) else (o,) for o in (want, got))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == "meta" and g.shape == w.shape and g.dtype == w.dtype


@pytest.mark.gpu
@pytest.mark.parametrize("name,position", MIXED)
def test_one_cpu_tensor_among_cuda_ones_is_refused(name, position):
    """The CUDA kernel runs (a CUDA tensor is there): its C++ checks refuse the CPU tensor."""
    op, args = _op_args()[name]
    args = _moved(args, "cuda")
    _assert_refused(lambda: op(*_moved(args, "cpu", position)), ("cpu", "cuda"))
