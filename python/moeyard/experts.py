"""Expert modules: the routed experts (stacked weights, computed by :func:`moeyard.expert_ffn`), the
dense SwiGLU MLP used as a shared expert, and SMEAR's merged experts (:func:`moeyard.merged_linear`).

Weights are stored in Hugging Face v5's layout so checkpoints map one to one:
``gate_up_proj [E, N1, d]`` (nn.Linear order; N1 = 2I for the gated activations: gate rows then up
rows, or GPT-OSS's interleaved (gate, up) rows for ``"swiglu_oss"``; N1 = I for ungated ones),
``down_proj [E, d, I]``, optional ``gate_up_proj_bias [E, N1]`` and ``down_proj_bias [E, d]``.
Every module here takes every activation of :data:`moeyard.ACTIVATIONS`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .ops import EXPERTS_BACKENDS, RoutingPlan, expert_ffn, merged_linear
from .reference import ACTIVATIONS

__all__ = ["Experts", "SwiGLUMLP", "MergedExperts"]


class _StackedExperts(nn.Module):
    """E expert MLPs' parameters, stacked in Hugging Face v5's layout (see the module docstring),
    their initialization and repr; subclasses say how the experts run (``forward``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str = "swiglu", bias: bool = False, initializer_range: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(reference.unknown_activation(activation))
        for name, v in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size, self.activation = intermediate_size, activation
        self.initializer_range = initializer_range
        n1 = (2 if reference.is_gated(activation) else 1) * intermediate_size
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, n1, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size,
                                                  **kw))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, n1, **kw))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, initializer_range^2), biases 0 (Hugging Face's initialization)."""
        nn.init.normal_(self.gate_up_proj, std=self.initializer_range)
        nn.init.normal_(self.down_proj, std=self.initializer_range)
        if self.gate_up_proj_bias is not None:
            nn.init.zeros_(self.gate_up_proj_bias)
            nn.init.zeros_(self.down_proj_bias)

    @property
    def gate_weight(self) -> Tensor:
        """Each expert's input (gate) projection ``W_g [E, I, d]``, a view of ``gate_up_proj``:
        the gate half (rows ``0..I-1``) for the gated activations on halves (``"swiglu"``,
        ``"geglu"``, ...), the even rows for ``"swiglu_oss"`` (interleaved gate, up), all of it
        for the ungated ones (their only input projection). The ERC loss probes it
        (:func:`moeyard.erc_loss`)."""
        gate = reference.ACTIVATIONS[self.activation].gate
        if gate == "halves":
            return self.gate_up_proj[:, :self.intermediate_size]
        if gate == "oss":
            return self.gate_up_proj[:, 0::2]
        return self.gate_up_proj

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, "
                f"bias={self.gate_up_proj_bias is not None}")


class Experts(_StackedExperts):
    """E expert MLPs ``y_e(x) = act(x W1_e^T + b1_e) W2_e^T + b2_e`` with stacked weights.

    ``forward(x [T, d], plan, weights [T, k]) -> [T, d]`` returns
    ``sum_j weights[t, j] * y_{e(t, j)}(x[t])`` over the slots of token t that have a row in
    ``plan``; dropped or unrouted slots add 0. All of it is one :func:`moeyard.expert_ffn` call.

    Args:
        num_experts: E.
        hidden_size: d (the model width).
        intermediate_size: I (each expert's hidden width).
        activation: a name of :data:`moeyard.ACTIVATIONS` (see :func:`moeyard.expert_ffn`);
            default ``"swiglu"`` (Mixtral, Qwen, DeepSeek).
        bias: add ``gate_up_proj_bias`` and ``down_proj_bias`` (initialized to zero). Default False.
        initializer_range: std of the normal init of the weights, as Hugging Face's
            ``_init_weights`` (``config.initializer_range``, default 0.02).
        backend: which code computes the experts: ``"auto"`` (default), ``"grouped_mm"``
            (torch's grouped GEMM) or ``"moeyard"`` (moeyard's own); see
            :func:`moeyard.expert_ffn`. An attribute: set ``experts.backend`` to switch later.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str = "swiglu", bias: bool = False, initializer_range: float = 0.02,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(num_experts, hidden_size, intermediate_size, activation, bias,
                         initializer_range, device, dtype)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in EXPERTS_BACKENDS:
            raise ValueError(f"backend must be one of {EXPERTS_BACKENDS}, got {value!r}")
        self._backend = value

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend != "auto"
                                       else "")

    def forward(self, x: Tensor, plan: RoutingPlan, weights: Tensor) -> Tensor:
        return expert_ffn(x, plan, weights, self.gate_up_proj, self.down_proj,
                          self.gate_up_proj_bias, self.down_proj_bias, self.activation,
                          backend=self.backend)


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``, nn.Linear without bias:
    the shared expert of Qwen2-MoE and DeepSeek-V3 (same parameter names as Hugging Face's).
    Every token goes through it, so it is plain dense matmuls, not routed expert compute.
    Weights ~ N(0, initializer_range^2), default 0.02."""

    def __init__(self, hidden_size: int, intermediate_size: int, initializer_range: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=initializer_range)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MergedExperts(_StackedExperts):
    """SMEAR's experts (ALGORITHMS.md 3.3): E MLPs whose parameters are averaged per example with
    its routing probabilities, then run once: ``forward(x [B, S, d], probs [B, E]) -> [B, S, d]``,
    ``out[b] = act(x[b] W1_b^T + b1_b) W2_b^T + b2_b`` with ``W_b = sum_e probs[b, e] W_e``
    (two :func:`moeyard.merged_linear` calls around the activation; no per-expert forward).

    Parameters in Hugging Face v5's layout, named as :class:`Experts`: ``gate_up_proj [E, N1, d]``
    (N1 = 2I for the gated activations, I otherwise), ``down_proj [E, d, I]``, optional
    ``gate_up_proj_bias [E, N1]`` and ``down_proj_bias [E, d]``.

    Args:
        num_experts, hidden_size, intermediate_size: E, d, I.
        activation: a name of :data:`moeyard.ACTIVATIONS`: ``"swiglu"`` (default, as the other
            layers), ``"silu"`` (swish: SMEAR's bottleneck adapters), ``"gelu"``, ``"relu"``, ...
            Computed in fp32 (fp64 for fp64) by :func:`moeyard.reference.activation`, kept in
            x's dtype.
        bias: with ``gate_up_proj_bias`` and ``down_proj_bias`` (zeros at init; SMEAR's adapters
            have a down-projection bias). Default False.
        initializer_range: std of the normal init of the weights (default 0.02).
    """

    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        h = merged_linear(x, probs, self.gate_up_proj, self.gate_up_proj_bias)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        a = reference.activation(h.to(acc), self.activation).to(h.dtype)
        return merged_linear(a, probs, self.down_proj, self.down_proj_bias)
