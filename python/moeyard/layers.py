"""MoE layers as drop-in replacements for a transformer block's MLP.

``forward(x [..., d]) -> [..., d]`` (``[B, S, d]`` or ``[T, d]``): router (fp32) ->
:func:`moeyard.route` -> :func:`moeyard.plan` -> :class:`Experts` (:func:`moeyard.expert_ffn`),
plus an optional dense shared expert. Tokens that a capacity drops get 0 from the layer (the
block's residual carries them).

After every forward the layer holds
  ``aux_losses``  dict of scalar tensors, already multiplied by their coefficients (``"balance"``:
                  Switch load-balancing loss on the pre-drop counts, ``"z"``: router z-loss), only
                  the ones whose coefficient is > 0; :func:`moeyard.collect_aux_losses` sums them
                  over a model. Add them to the loss after each forward (micro-batch).
  ``last_stats``  :func:`moeyard.load_stats` of the plan (tokens per expert, MaxVio, dropped
                  fraction), device tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .experts import Experts, SwiGLUMLP
from .ops import expert_capacity, load_stats, plan, router_losses
from .routers import TopKRouter

__all__ = ["TopKMoE", "SwitchMoE"]


class TopKMoE(nn.Module):
    """Top-k MoE layer: Mixtral / Qwen / DeepSeek family.

    Args:
        hidden_size: d. intermediate_size: I of each routed expert. num_experts: E.
        k: experts per token (default 2).
        score, topk_before_score, renormalize, scale, n_group, topk_group: routing, as
            :class:`TopKRouter` (defaults: softmax, no renormalization, scale 1, no groups).
        capacity_factor: training capacity ``max(ceil(T k / E * cf), min_capacity)`` per expert,
            over-capacity assignments dropped by position (every first choice before any second
            choice, earlier tokens first); None (default) = dropless.
        eval_capacity_factor: the same in eval mode; None (default) = dropless.
        min_capacity: lower bound of the capacity (default 4).
        aux_loss_coef: coefficient of the Switch load-balancing loss (:func:`moeyard.router_losses`,
            1 at perfect balance for any k; Hugging Face's ``load_balancing_loss_func`` is k times
            it); default 1e-2; 0 turns it off.
        z_loss_coef: coefficient of the router z-loss; default 0 (off).
        bias_balancing: auxiliary-loss-free balancing: a selection bias in the router, updated by
            :class:`moeyard.BiasBalancer` after each optimizer step. Default False.
        jitter_eps: multiplicative input jitter of the router in training (default 0).
        shared_intermediate_size: width of a dense SwiGLU shared expert added to every token's
            output (Qwen2-MoE, DeepSeek-V3); None (default) = none.
        shared_gate: scale the shared expert by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE,
            ``Linear(d, 1, bias=False)``); default False.
        activation, expert_bias: the routed experts' activation (default ``"swiglu"``) and
            whether they have biases (default False).
        initializer_range: std of the normal init of every weight (default 0.02, Hugging Face).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, k: int = 2, *,
                 score: str = "softmax", topk_before_score: bool = False,
                 renormalize: bool = False, scale: float = 1.0, n_group: int = 1,
                 topk_group: int = 1, capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4,
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 0.0,
                 bias_balancing: bool = False, jitter_eps: float = 0.0,
                 shared_intermediate_size: Optional[int] = None, shared_gate: bool = False,
                 activation: str = "swiglu", expert_bias: bool = False,
                 initializer_range: float = 0.02, device=None, dtype=None):
        super().__init__()
        for name, cf in (("capacity_factor", capacity_factor),
                         ("eval_capacity_factor", eval_capacity_factor)):
            if cf is not None and not cf > 0:
                raise ValueError(f"{name}={cf} must be > 0 or None (dropless)")
        if min_capacity < 0:
            raise ValueError(f"min_capacity={min_capacity} must be >= 0")
        if aux_loss_coef < 0 or z_loss_coef < 0:
            raise ValueError(f"aux_loss_coef={aux_loss_coef} and z_loss_coef={z_loss_coef} must "
                             "be >= 0")
        if shared_gate and shared_intermediate_size is None:
            raise ValueError("shared_gate needs a shared expert (shared_intermediate_size)")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = TopKRouter(hidden_size, num_experts, k, score,
                                 topk_before_score=topk_before_score, renormalize=renormalize,
                                 scale=scale, n_group=n_group, topk_group=topk_group,
                                 bias_balancing=bias_balancing, jitter_eps=jitter_eps,
                                 initializer_range=initializer_range, **kw)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation,
                               expert_bias, initializer_range, **kw)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size is not None:
            self.shared_expert = SwiGLUMLP(hidden_size, shared_intermediate_size,
                                           initializer_range, **kw)
            if shared_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **kw)
                nn.init.normal_(self.shared_expert_gate.weight, std=initializer_range)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------ presets

    @classmethod
    def mixtral(cls, hidden_size: int, intermediate_size: int, num_experts: int = 8, k: int = 2,
                **kwargs) -> "TopKMoE":
        """Mixtral: softmax -> top-2 -> renormalized, dropless, aux-loss coefficient 1e-3
        (Hugging Face's ``router_aux_loss_coef``)."""
        kwargs = {"renormalize": True, "aux_loss_coef": 1e-3, **kwargs}
        return cls(hidden_size, intermediate_size, num_experts, k, **kwargs)

    @classmethod
    def qwen3_moe(cls, hidden_size: int, intermediate_size: int, num_experts: int = 128,
                  k: int = 8, **kwargs) -> "TopKMoE":
        """Qwen3-MoE: softmax -> top-8, not renormalized (``norm_topk_prob=False``, HF's
        default; pass ``renormalize=True`` for checkpoints that set it), aux-loss coef 1e-3."""
        kwargs = {"renormalize": False, "aux_loss_coef": 1e-3, **kwargs}
        return cls(hidden_size, intermediate_size, num_experts, k, **kwargs)

    @classmethod
    def qwen2_moe(cls, hidden_size: int, intermediate_size: int, shared_intermediate_size: int,
                  num_experts: int = 60, k: int = 4, **kwargs) -> "TopKMoE":
        """Qwen2-MoE: as Qwen3-MoE with k = 4 of 60, plus a shared expert gated by
        ``sigmoid(shared_expert_gate(x))``."""
        kwargs = {"renormalize": False, "aux_loss_coef": 1e-3, "shared_gate": True, **kwargs}
        return cls(hidden_size, intermediate_size, num_experts, k,
                   shared_intermediate_size=shared_intermediate_size, **kwargs)

    @classmethod
    def deepseek_v3(cls, hidden_size: int, intermediate_size: int, num_experts: int = 256,
                    k: int = 8, n_group: int = 8, topk_group: int = 4,
                    n_shared_experts: int = 1, **kwargs) -> "TopKMoE":
        """DeepSeek-V3: sigmoid scores, selection bias (auxiliary-loss-free balancing, no aux
        loss), top-8 within the best 4 of 8 groups, renormalized, scaled by 2.5, and an ungated
        shared expert of width ``n_shared_experts * intermediate_size``."""
        kwargs = {"score": "sigmoid", "renormalize": True, "scale": 2.5, "aux_loss_coef": 0.0,
                  "bias_balancing": True,
                  "shared_intermediate_size": n_shared_experts * intermediate_size or None,
                  **kwargs}
        return cls(hidden_size, intermediate_size, num_experts, k, n_group=n_group,
                   topk_group=topk_group, **kwargs)

    # ------------------------------------------------------------------------------ forward

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity per expert for ``num_tokens`` tokens in the current mode (None: dropless)."""
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.k, cf, self.min_capacity)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{type(self).__name__} expects [..., hidden_size={self.hidden_size}]"
                             f" input, got shape {tuple(x.shape)}")
        h = x.reshape(-1, self.hidden_size)
        logits, weights, experts = self.router(h)
        p = plan(experts, self.num_experts, self.capacity(h.shape[0]))
        out = self.experts(h, p, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        self.router.record_load(p.counts)
        self.aux_losses = self._aux_losses(logits, p.counts)
        self.last_stats = load_stats(p)
        return out.view(x.shape)

    def _aux_losses(self, logits: Tensor, counts: Tensor) -> dict[str, Tensor]:
        losses = {}
        if self.aux_loss_coef > 0 or self.z_loss_coef > 0:
            balance, z = router_losses(logits, counts, self.k)
            if self.aux_loss_coef > 0:
                losses["balance"] = self.aux_loss_coef * balance
            if self.z_loss_coef > 0:
                losses["z"] = self.z_loss_coef * z
        return losses

    def extra_repr(self) -> str:
        return (f"capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, "
                f"min_capacity={self.min_capacity}, aux_loss_coef={self.aux_loss_coef}, "
                f"z_loss_coef={self.z_loss_coef}")


class SwitchMoE(TopKMoE):
    """Switch Transformer layer (Fedus et al.): top-1 softmax routing, the expert output scaled by
    its unnormalized probability ``p_e``, capacity with position-order drops, input jitter.

    Defaults (Switch / mesh-tensorflow): ``capacity_factor=1.25`` in training,
    ``eval_capacity_factor=2.0`` (None = dropless), ``min_capacity=4``, ``jitter_eps=1e-2``
    (training only), ``aux_loss_coef=1e-2`` (load balancing on the pre-drop counts),
    ``z_loss_coef=1e-3`` (ST-MoE), ungated ``activation="relu"`` experts (T5 FFN), no shared
    expert. The whole batch is one capacity group. Other keywords go to :class:`TopKMoE`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, *,
                 capacity_factor: Optional[float] = 1.25,
                 eval_capacity_factor: Optional[float] = 2.0, min_capacity: int = 4,
                 jitter_eps: float = 1e-2, aux_loss_coef: float = 1e-2,
                 z_loss_coef: float = 1e-3, activation: str = "relu", **kwargs):
        super().__init__(hidden_size, intermediate_size, num_experts, 1,
                         capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                         jitter_eps=jitter_eps, aux_loss_coef=aux_loss_coef,
                         z_loss_coef=z_loss_coef, activation=activation, **kwargs)
