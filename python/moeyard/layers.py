"""MoE layers as drop-in replacements for a transformer block's MLP.

``forward(x [..., d]) -> [..., d]`` (``[B, S, d]`` or ``[T, d]``): router (fp32) ->
:func:`moeyard.route` -> :func:`moeyard.plan` -> :class:`Experts` (:func:`moeyard.expert_ffn`),
plus an optional dense shared expert. Tokens that a capacity drops get 0 from the layer (the
block's residual carries them). :class:`ReMoE` routes by :func:`moeyard.relu_route` and
:class:`TopPMoE` by :func:`moeyard.top_p_route` (variable experts per token),
:class:`ExpertChoiceMoE` by :func:`moeyard.expert_choice`, :class:`BaseMoE` by
:func:`moeyard.balanced_assignment` (BASE layers); all use the same :class:`Experts`.
:class:`SmearMoE` routes whole examples and merges the experts' parameters (:class:`SmearRouter`,
:class:`MergedExperts`, :func:`moeyard.merged_linear`).

After every forward the layer holds
  ``aux_losses``  dict of scalar tensors, already multiplied by their coefficients (``"balance"``:
                  Switch load-balancing loss on the pre-drop counts, ``"seq_balance"``:
                  DeepSeek-V3's sequence-wise one, ``"z"``: router z-loss, ``"erc"``:
                  expert-router coupling loss, ``"entropy"``: top-p routing's entropy loss,
                  ``"l1"``: ReMoE's L1), only the ones whose coefficient is > 0;
                  :func:`moeyard.collect_aux_losses` sums them over a model. Add them to the loss
                  after each forward (micro-batch).
  ``last_stats``  :func:`moeyard.load_stats` of the plan (tokens per expert, MaxVio, dropped
                  fraction), device tensors.

Every forward hands its routing to :func:`moeyard.report_routing` (a no-op unless a
:func:`moeyard.record_routing` recorder is active): a new layer type does the same, once, after
its plan.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import Experts, MergedExperts, SwiGLUMLP
from .ops import (balanced_assignment, erc_loss, expert_capacity, expert_choice, load_stats, plan,
                  route, router_entropy, router_losses, sequence_balance_loss)
from .routers import (ReLURouter, RouterLinear, SmearRouter, TopKRouter, TopPRouter,
                      check_sizes)
from .telemetry import report_routing, routing_entropy

__all__ = ["TopKMoE", "SwitchMoE", "ReMoE", "TopPMoE", "ExpertChoiceMoE", "BaseMoE", "SmearMoE"]


def _experts(ep_group, *args, **kwargs) -> Experts:
    """The routed experts: all of them, or with an expert-parallel group this rank's block
    (:class:`moeyard.distributed.ShardedExperts`; torch.distributed is imported only then)."""
    if ep_group is None:
        return Experts(*args, **kwargs)
    from .distributed import ShardedExperts
    return ShardedExperts(*args, **kwargs, ep_group=ep_group)


class _Shared:
    """Holds a process group for a module: a deep copy of the module shares it (a ProcessGroup
    cannot be copied, and a copy of a layer takes part in the same collectives)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class _Layer(nn.Module):
    """Base of the MoE layers: ``aux_losses`` and ``last_stats`` belong to the last forward (the
    losses carry its autograd graph), so copies and pickles of a layer start without them
    (``copy.deepcopy`` cannot copy tensors inside a graph)."""

    def __getstate__(self):
        return {**super().__getstate__(), "aux_losses": {}, "last_stats": {}}


def _check_capacity(capacity_factor, eval_capacity_factor, min_capacity) -> None:
    for name, cf in (("capacity_factor", capacity_factor),
                     ("eval_capacity_factor", eval_capacity_factor)):
        if cf is not None and not cf > 0:
            raise ValueError(f"{name}={cf} must be > 0 or None (dropless)")
    if min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity} must be >= 0")


def _tokens(layer: nn.Module, x: Tensor) -> Tensor:
    """``x [..., d]`` as ``[T, d]``; ValueError if its last dim is not the layer's hidden size."""
    if x.dim() < 1 or x.shape[-1] != layer.hidden_size:
        raise ValueError(f"{type(layer).__name__} expects [..., hidden_size={layer.hidden_size}] "
                         f"input, got shape {tuple(x.shape)}")
    return x.reshape(-1, layer.hidden_size)


class TopKMoE(_Layer):
    """Top-k MoE layer: Mixtral / Qwen / DeepSeek family.

    Args:
        hidden_size: d. intermediate_size: I of each routed expert. num_experts: E.
        k: experts per token (default 2).
        score, topk_before_score, renormalize, scale, n_group, topk_group: routing, as
            :class:`TopKRouter` (defaults: softmax, no renormalization, scale 1, no groups);
            ``score="sparsemixer"`` is GRIN's routing (see :meth:`phimoe`).
        sparsemixer_eps, generator: ``score="sparsemixer"``'s window (default 0.01) and the
            generator of its training noise (default None: torch's global one), as
            :class:`TopKRouter`.
        capacity_factor: training capacity ``max(ceil(T k / E * cf), min_capacity)`` per expert,
            over-capacity assignments dropped by position (every first choice before any second
            choice, earlier tokens first); None (default) = dropless.
        eval_capacity_factor: the same in eval mode; None (default) = dropless.
        min_capacity: lower bound of the capacity (default 4).
        aux_loss_coef: coefficient of the Switch load-balancing loss (:func:`moeyard.router_losses`
            on the pre-drop counts, 1 at perfect balance for any k; Hugging Face's
            ``load_balancing_loss_func`` is k times it); 0 turns it off. Default: 1e-2, or 0 with
            ``bias_balancing=True`` (Loss-Free Balancing uses no auxiliary loss; pass a
            coefficient explicitly for a hybrid). ``P_e`` is the mean softmax probability, or with
            ``score="sigmoid"`` the mean of the sigmoid affinities normalized per token
            (DeepSeek-V3 eq. 19-20; the Loss-Free Balancing paper's baseline).
        seq_aux_loss_coef: coefficient of DeepSeek-V3's complementary sequence-wise balance loss
            (eq. 17-20, :func:`moeyard.sequence_balance_loss`): per sequence of the input
            (``[B, S, d]``: B sequences of S tokens; ``[T, d]``: one), ``f_e`` from each token's
            plain top-k of the scores (no selection bias, no group limit: eq. 18) and ``P_e`` the
            mean normalized score; averaged over the sequences. Default 0 (off);
            :meth:`deepseek_v3` sets the paper's 1e-4.
        z_loss_coef: coefficient of the router z-loss; default 0 (off).
        bias_balancing: auxiliary-loss-free balancing: a selection bias in the router, updated by
            :class:`moeyard.BiasBalancer` after each optimizer step. Default False.
        jitter_eps: multiplicative input jitter of the router in training (default 0).
        shared_intermediate_size: width of a dense SwiGLU shared expert added to every token's
            output (Qwen2-MoE, DeepSeek-V3); None (default) = none.
        shared_gate: scale the shared expert by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE,
            ``Linear(d, 1, bias=False)``); default False.
        activation, expert_bias: the routed experts' activation, a name of
            :data:`moeyard.ACTIVATIONS` (default ``"swiglu"``), and whether they have biases
            (default False).
        initializer_range: std of the normal init of every weight (default 0.02, Hugging Face).
        backend: the expert-compute backend, ``"auto"`` (default), ``"grouped_mm"`` or
            ``"moeyard"`` (:func:`moeyard.expert_ffn`; ``layer.experts.backend`` changes it later).
        ep_group: expert parallelism: a process group (or 1-D DeviceMesh) over which the experts
            are sharded; the layer then holds only this rank's ``E / P`` experts
            (:class:`moeyard.distributed.ShardedExperts`) and every forward is collective. With a
            capacity factor the exchange is sync-free; dropless it syncs once per forward (see
            :mod:`moeyard.distributed`). Default None: all experts local.
        balance_group: compute the load-balancing loss on the global batch of this process
            group (arXiv 2501.11873): the expert counts (and token counts) are summed over its
            ranks (one all-reduce, no gradient), the mean probabilities stay local. Default None:
            the local batch.
        erc_loss_coef: coefficient of the expert-router coupling loss (Lv et al., ICLR 2026;
            :func:`moeyard.erc_loss` on ``router.weight`` and ``experts.gate_weight``), added as
            ``aux_losses["erc"]`` in training forwards (``module.training``; the paper applies it
            in training only, with coefficient 1). Its cost does not depend on the batch:
            ``2 E^2 I d`` FLOPs. Default 0 (off). Not with ``ep_group`` (it needs every expert's
            gate projection on one rank).
        erc_alpha: the ERC margin alpha (default 1.0, the paper's default; it found 0.5 best
            with 256 experts).
        erc_generator: the ``torch.Generator`` that draws the ERC proxy-token noise (an
            attribute, ``layer.erc_generator``; None, the default: torch's default generator).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, k: int = 2, *,
                 score: str = "softmax", topk_before_score: bool = False,
                 renormalize: bool = False, scale: float = 1.0, n_group: int = 1,
                 topk_group: int = 1, capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4,
                 aux_loss_coef: Optional[float] = None, seq_aux_loss_coef: float = 0.0,
                 z_loss_coef: float = 0.0, bias_balancing: bool = False, jitter_eps: float = 0.0,
                 sparsemixer_eps: float = 0.01, generator: Optional[torch.Generator] = None,
                 shared_intermediate_size: Optional[int] = None, shared_gate: bool = False,
                 activation: str = "swiglu", expert_bias: bool = False,
                 initializer_range: float = 0.02, backend: str = "auto", ep_group=None,
                 balance_group=None, erc_loss_coef: float = 0.0, erc_alpha: float = 1.0,
                 erc_generator: Optional[torch.Generator] = None, device=None, dtype=None):
        super().__init__()
        _check_capacity(capacity_factor, eval_capacity_factor, min_capacity)
        if aux_loss_coef is None:
            aux_loss_coef = 0.0 if bias_balancing else 1e-2
        if min(aux_loss_coef, seq_aux_loss_coef, z_loss_coef, erc_loss_coef) < 0:
            raise ValueError(f"aux_loss_coef={aux_loss_coef}, seq_aux_loss_coef="
                             f"{seq_aux_loss_coef}, z_loss_coef={z_loss_coef} and "
                             f"erc_loss_coef={erc_loss_coef} must be >= 0")
        if not erc_alpha >= 0:
            raise ValueError(f"erc_alpha={erc_alpha} must be >= 0")
        if erc_loss_coef > 0 and ep_group is not None:
            raise ValueError("erc_loss_coef > 0 needs every expert's gate projection on this rank; "
                             "it is not supported with ep_group")
        if shared_gate and shared_intermediate_size is None:
            raise ValueError("shared_gate needs a shared expert (shared_intermediate_size)")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.seq_aux_loss_coef = seq_aux_loss_coef
        self.erc_loss_coef, self.erc_alpha = erc_loss_coef, erc_alpha
        self.erc_generator = erc_generator
        self._balance_group = _Shared(balance_group)
        self.router = TopKRouter(hidden_size, num_experts, k, score,
                                 topk_before_score=topk_before_score, renormalize=renormalize,
                                 scale=scale, n_group=n_group, topk_group=topk_group,
                                 bias_balancing=bias_balancing, jitter_eps=jitter_eps,
                                 sparsemixer_eps=sparsemixer_eps, generator=generator,
                                 initializer_range=initializer_range, **kw)
        self.experts = _experts(ep_group, num_experts, hidden_size, intermediate_size,
                                activation, expert_bias, initializer_range, **kw, backend=backend)
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
        """DeepSeek-V3: sigmoid scores, selection bias (auxiliary-loss-free balancing, no Switch
        aux loss) plus the complementary sequence-wise balance loss with the paper's alpha 1e-4,
        top-8 within the best 4 of 8 groups, renormalized, scaled by 2.5, and an ungated shared
        expert of width ``n_shared_experts * intermediate_size``."""
        kwargs = {"score": "sigmoid", "renormalize": True, "scale": 2.5, "aux_loss_coef": 0.0,
                  "seq_aux_loss_coef": 1e-4, "bias_balancing": True,
                  "shared_intermediate_size": n_shared_experts * intermediate_size or None,
                  **kwargs}
        return cls(hidden_size, intermediate_size, num_experts, k, n_group=n_group,
                   topk_group=topk_group, **kwargs)

    @classmethod
    def phimoe(cls, hidden_size: int, intermediate_size: int, num_experts: int = 16,
               **kwargs) -> "TopKMoE":
        """PhiMoE / GRIN (Liu et al. 2024, arXiv 2409.12136): GRIN's SparseMixer-v2 routing
        (:func:`moeyard.sparsemixer`: top-2 within a window of the maximum, experts sampled in
        training with GRIN's gradient estimator, the top two in eval), window
        ``sparsemixer_eps=0.01`` (``PhimoeConfig.router_jitter_noise``), 16 experts, dropless,
        aux-loss coefficient 1e-3 (``router_aux_loss_coef``; counted on the sampled experts).
        PhiMoE's ``input_jitter_noise`` (default 0) multiplies the block's input, experts
        included; moeyard's ``jitter_eps`` jitters the router's input only."""
        kwargs = {"score": "sparsemixer", "aux_loss_coef": 1e-3, **kwargs}
        return cls(hidden_size, intermediate_size, num_experts, 2, **kwargs)

    @property
    def balance_group(self):
        """The process group of the global-batch balance loss (None: the local batch)."""
        return self._balance_group.value

    @balance_group.setter
    def balance_group(self, group) -> None:
        self._balance_group = _Shared(group)

    # ------------------------------------------------------------------------------ forward

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity per expert for ``num_tokens`` tokens in the current mode (None: dropless)."""
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.k, cf, self.min_capacity)

    def forward(self, x: Tensor) -> Tensor:
        h = _tokens(self, x)
        logits, weights, experts = self.router(h)
        p = plan(experts, self.num_experts, self.capacity(h.shape[0]))
        out = self.experts(h, p, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        self.router.record_load(p.counts)
        # the sequences of a [..., S, d] input (a [T, d] input is one), for the sequence-wise loss
        sequences = h.shape[0] // x.shape[-2] if x.dim() >= 3 and h.shape[0] else 1
        self.aux_losses = self._aux_losses(logits, p.counts, sequences)
        if self.erc_loss_coef > 0 and self.training:
            self.aux_losses["erc"] = self.erc_loss_coef * erc_loss(
                self.router.weight, self.experts.gate_weight, self.erc_alpha,
                generator=self.erc_generator)
        self.last_stats = load_stats(p)
        report_routing(self, logits=logits, experts=experts, weights=weights, plan=p)
        return out.view(x.shape)

    def _aux_losses(self, logits: Tensor, counts: Tensor, sequences: int) -> dict[str, Tensor]:
        losses = {}
        sigmoid = self.router.score == "sigmoid"
        if self.aux_loss_coef > 0 or self.z_loss_coef > 0:
            share = None
            if self.aux_loss_coef > 0 and self.balance_group is not None:
                from .distributed import global_batch_counts
                counts, share = global_batch_counts(counts, logits.shape[0], self.balance_group)
            balance, z = router_losses(logits, counts, self.k,
                                       "sigmoid" if sigmoid else "softmax")
            if share is not None:  # router_losses divides the counts by the local T
                balance = balance * share
            if self.aux_loss_coef > 0:
                losses["balance"] = self.aux_loss_coef * balance
            if self.z_loss_coef > 0:
                losses["z"] = self.z_loss_coef * z
        if self.seq_aux_loss_coef > 0:
            scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
            plain_topk = route(logits, self.k, "none")[1]  # monotone in the scores: their top-k
            losses["seq_balance"] = self.seq_aux_loss_coef * sequence_balance_loss(
                scores, plain_topk, sequences)
        return losses

    def extra_repr(self) -> str:
        return (f"capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, "
                f"min_capacity={self.min_capacity}, aux_loss_coef={self.aux_loss_coef}, "
                f"seq_aux_loss_coef={self.seq_aux_loss_coef}, z_loss_coef={self.z_loss_coef}"
                + (f", erc_loss_coef={self.erc_loss_coef}, erc_alpha={self.erc_alpha}"
                   if self.erc_loss_coef > 0 else ""))


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


class ReMoE(_Layer):
    """ReMoE layer (Wang, Zhu, Chen, ICLR 2025): ReLU routing with an adaptive L1 penalty.

    Gates ``relu(x W^T)`` (fp32, :class:`ReLURouter`) are the combine weights (not normalized);
    every expert with a positive gate computes the token (dropless, variable experts per token, a
    token may get none and then 0 from the layer). ``k`` is the *target* experts per token: the
    controller drives the sparsity (fraction of zero gates) toward ``1 - k/E``.

    In training forwards with grad enabled the layer adds ``aux_losses["l1"] =
    lambda * sum_e f_e * mean_t gates[t, e]`` with ``f_e = E * count_e / (k * T)`` (detached
    counts of active gates; Megatron's ``switch_load_balancing_loss_func`` on the ReLU gates, as
    thu-ml/ReMoE) and ``lambda`` the buffer ``l1_reg_coeff`` (fp32 scalar, saved in the state dict,
    kept fp32 under ``.to(bf16)``), and accumulates its sparsity into ``sparsity_since_update`` /
    ``forwards_since_update`` (not saved) for :class:`moeyard.ReMoEController`, which updates
    lambda after each optimizer step. Eval / no-grad forwards add no loss and count nothing.
    ``last_stats``: :func:`moeyard.load_stats` of the plan plus ``"sparsity"``.

    Args:
        hidden_size, intermediate_size, num_experts: d, I, E.
        k: target active experts per token (default 1, ReMoE's scripts: E=8, k=1).
        k_max: bound on the experts per token (the smallest gates beyond it are dropped); None
            (default) = E, exactly ReMoE.
        l1_coef_init: lambda_0 (default 1e-8, ReMoE's ``moe_relu_l1_reg_coeff_init``).
        jitter_eps: multiplicative router input jitter in training (default 0).
        capacity_factor, eval_capacity_factor, min_capacity: an expert capacity, as
            :class:`TopKMoE` with the target k (``max(ceil(T k / E * cf), min_capacity)``,
            position-order drops); default None: dropless, as ReMoE. With ``ep_group`` a capacity
            makes the exchange sync-free.
        ep_group: expert parallelism, as :class:`TopKMoE`.
        activation, expert_bias, initializer_range, backend: the experts, as :class:`TopKMoE`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, k: int = 1, *,
                 k_max: Optional[int] = None, l1_coef_init: float = 1e-8,
                 jitter_eps: float = 0.0, capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4,
                 activation: str = "swiglu", expert_bias: bool = False,
                 initializer_range: float = 0.02, backend: str = "auto", ep_group=None,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        _check_capacity(capacity_factor, eval_capacity_factor, min_capacity)
        if not l1_coef_init > 0:
            raise ValueError(f"l1_coef_init={l1_coef_init} must be > 0")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.router = ReLURouter(hidden_size, num_experts, k_max, jitter_eps=jitter_eps,
                                 initializer_range=initializer_range, **kw)
        self.experts = _experts(ep_group, num_experts, hidden_size, intermediate_size,
                                activation, expert_bias, initializer_range, **kw, backend=backend)
        self.register_buffer("l1_reg_coeff",
                             torch.tensor(float(l1_coef_init), device=device, dtype=torch.float32))
        self.register_buffer("sparsity_since_update",
                             torch.zeros((), device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("forwards_since_update",
                             torch.zeros((), device=device, dtype=torch.int64), persistent=False)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    capacity = TopKMoE.capacity

    @property
    def target_sparsity(self) -> float:
        """``1 - k / E``."""
        return 1.0 - self.k / self.num_experts

    def _apply(self, fn, recurse=True):
        # lambda and the sparsity sum stay fp32 under model.to(bf16) (x1.2 updates would lose
        # precision in bf16), as ReMoE keeps its coefficient out of the half casts.
        super()._apply(fn, recurse)
        for name in ("l1_reg_coeff", "sparsity_since_update"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def forward(self, x: Tensor) -> Tensor:
        h = _tokens(self, x)
        logits, weights, experts = self.router(h)
        p = plan(experts, self.num_experts, self.capacity(h.shape[0]))
        out = self.experts(h, p, weights)
        T, E = h.shape[0], self.num_experts
        sparsity = 1.0 - p.counts.sum().float() / max(T * E, 1)
        self.aux_losses = {}
        if self.training and torch.is_grad_enabled():
            self.sparsity_since_update.add_(sparsity)
            self.forwards_since_update.add_(1)
            self.aux_losses = {"l1": self.l1_reg_coeff * self.l1_loss(logits, p.counts)}
        self.last_stats = {**load_stats(p), "sparsity": sparsity}
        report_routing(self, logits=logits, experts=experts, weights=weights, plan=p)
        return out.view(x.shape)

    def l1_loss(self, logits: Tensor, counts: Tensor) -> Tensor:
        """The load-balanced L1 term without lambda: ``sum_e f_e * mean_t relu(logits)[t, e]``,
        ``f_e = E * counts_e / (k * T)`` (counts detached)."""
        T = max(logits.shape[0], 1)
        f = counts.detach().float() * (self.num_experts / (self.k * T))
        return (f * F.relu(logits).sum(0)).sum() / T

    def extra_repr(self) -> str:
        return f"k={self.k}, target_sparsity={self.target_sparsity:.4g}"


class TopPMoE(_Layer):
    """Dynamic top-p MoE layer (Huang et al., "Harder Tasks Need More Experts", ACL 2024).

    Router ``P = softmax(x W^T)`` (fp32, :class:`TopPRouter`); each token takes the experts in
    descending probability until their probabilities sum past ``p``, the expert that crosses ``p``
    included (:func:`moeyard.top_p_route`), and each output is weighted by its raw probability
    (not renormalized): ``y = sum_kept P_e E_e(x)``. Confident tokens use one expert, uncertain
    ones several. Dropless: every selected expert computes its token (no capacity, as the
    authors' code; with ``ep_group`` the exchange syncs once per forward).

    ``aux_losses`` (every forward, each only if its coefficient is > 0):
      ``"balance"``  ``aux_loss_coef * E * sum_e f_e P_e`` with ``f_e`` the fraction of tokens
                     that selected expert e and ``P_e`` its mean probability
                     (:func:`moeyard.router_losses` with k = 1: equals the mean experts per token
                     at perfect balance);
      ``"entropy"``  ``entropy_loss_coef * mean_t (-sum_e P_e log P_e)``
                     (:func:`moeyard.router_entropy`), the paper's dynamic loss: without it the
                     router drifts to flat distributions that select many experts;
      ``"z"``        ``z_loss_coef`` times the router z-loss (off by default).
    ``last_stats``: :func:`moeyard.load_stats` of the plan plus ``"experts_per_token"`` (mean
    experts per token, a device tensor).

    Args:
        hidden_size, intermediate_size, num_experts: d, I, E.
        p: the threshold in (0, 1] (default 0.4, ``top_p_threshold`` of the authors' code).
        k_max: bound on the experts per token; None (default) = E, as the paper. The plan has
            ``T * k_max`` rows (static shapes), so a bound saves memory with many experts.
        aux_loss_coef: balance-loss coefficient (default 1e-2, Switch's; the paper's own value
            could not be checked against its text).
        entropy_loss_coef: dynamic (entropy) loss coefficient (default 1e-4, as recalled in
            moeyard's spec; not checked against the paper's text either).
        z_loss_coef: router z-loss coefficient (default 0).
        jitter_eps: multiplicative router input jitter in training (default 0).
        activation, expert_bias, initializer_range, backend, ep_group: the experts, as
            :class:`TopKMoE` (the authors' experts are SwiGLU, the default).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 p: float = 0.4, *, k_max: Optional[int] = None, aux_loss_coef: float = 1e-2,
                 entropy_loss_coef: float = 1e-4, z_loss_coef: float = 0.0,
                 jitter_eps: float = 0.0, activation: str = "swiglu", expert_bias: bool = False,
                 initializer_range: float = 0.02, backend: str = "auto", ep_group=None,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("aux_loss_coef", aux_loss_coef), ("entropy_loss_coef", entropy_loss_coef),
                        ("z_loss_coef", z_loss_coef)):
            if not v >= 0:
                raise ValueError(f"{name}={v} must be >= 0")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.aux_loss_coef, self.entropy_loss_coef = aux_loss_coef, entropy_loss_coef
        self.z_loss_coef = z_loss_coef
        self.router = TopPRouter(hidden_size, num_experts, p, k_max, jitter_eps=jitter_eps,
                                 initializer_range=initializer_range, **kw)
        self.experts = _experts(ep_group, num_experts, hidden_size, intermediate_size,
                                activation, expert_bias, initializer_range, **kw, backend=backend)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    @property
    def p(self) -> float:
        """The threshold (the router's ``p``)."""
        return self.router.p

    @property
    def k_max(self) -> int:
        """The bound on the experts per token (the router's ``k_max``)."""
        return self.router.k_max

    def forward(self, x: Tensor) -> Tensor:
        h = _tokens(self, x)
        logits, weights, experts = self.router(h)
        p = plan(experts, self.num_experts)
        report_routing(self, logits=logits, experts=experts, weights=weights, plan=p)
        out = self.experts(h, p, weights)
        losses = {}
        if self.aux_loss_coef > 0 or self.z_loss_coef > 0:
            balance, z = router_losses(logits, p.counts, 1)
            if self.aux_loss_coef > 0:
                losses["balance"] = self.aux_loss_coef * balance
            if self.z_loss_coef > 0:
                losses["z"] = self.z_loss_coef * z
        if self.entropy_loss_coef > 0:
            losses["entropy"] = self.entropy_loss_coef * router_entropy(logits)
        self.aux_losses = losses
        per_token = p.counts.sum().float() / max(h.shape[0], 1)
        self.last_stats = {**load_stats(p), "experts_per_token": per_token}
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (f"p={self.p}, k_max={self.k_max}, aux_loss_coef={self.aux_loss_coef}, "
                f"entropy_loss_coef={self.entropy_loss_coef}, z_loss_coef={self.z_loss_coef}")


class ExpertChoiceMoE(_Layer):
    """Expert-choice layer (Zhou et al. 2022): each expert takes its top-C tokens.

    Scores ``softmax(x W^T)`` over experts per token (fp32, :class:`RouterLinear`); expert e takes
    the C tokens it scores highest (:func:`moeyard.expert_choice`), each weighted by its score;
    a token taken by no expert gets 0 from the layer. ``C = round(capacity_factor * T / E)``
    (flaxformer's ``ExpertsChooseMaskedRouter``; Python's round), clamped to ``[1, T]``.
    Loads are balanced by construction: no auxiliary loss (``aux_losses`` is empty).
    ``last_stats``: :func:`moeyard.load_stats` of the plan plus ``"unrouted_fraction"`` (tokens
    that no expert took).

    **Not causal**: which experts a token gets depends on the other tokens of the batch (later
    ones included), so it is for encoders and vision models, not for autoregressive decoding.
    The whole input (all ``B * S`` tokens) is one routing group; training and eval route alike.

    Args:
        hidden_size, intermediate_size, num_experts: d, I, E.
        capacity_factor: c, the average experts per token (default 2, as the paper).
        activation, expert_bias, initializer_range, backend: the experts, as :class:`TopKMoE`.
        ep_group: expert parallelism, as :class:`TopKMoE`: each expert takes its top-C tokens of
            every rank's batch (C from the local token count, the same on every rank), so each
            rank's output is the single-device layer's on its tokens; sync-free.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 capacity_factor: float = 2.0, *, activation: str = "swiglu",
                 expert_bias: bool = False, initializer_range: float = 0.02,
                 backend: str = "auto", ep_group=None, device=None, dtype=None):
        super().__init__()
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.capacity_factor = capacity_factor
        self.router = RouterLinear(hidden_size, num_experts,
                                   initializer_range=initializer_range, **kw)
        self.experts = _experts(ep_group, num_experts, hidden_size, intermediate_size,
                                activation, expert_bias, initializer_range, **kw, backend=backend)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert for ``num_tokens`` tokens: ``round(cf * T / E)`` in ``[1, T]``."""
        if num_tokens == 0:
            return 0
        return min(num_tokens, max(1, round(self.capacity_factor * num_tokens / self.num_experts)))

    def forward(self, x: Tensor) -> Tensor:
        h = _tokens(self, x)
        logits = self.router(h)
        scores = torch.softmax(logits, dim=-1)
        weights, experts, p = expert_choice(scores, self.capacity(h.shape[0]))
        out = self.experts(h, p, weights)
        self.aux_losses = {}
        unrouted = (experts < 0).all(dim=-1).sum().float() / max(h.shape[0], 1)
        self.last_stats = {**load_stats(p), "unrouted_fraction": unrouted}
        report_routing(self, logits=logits, experts=experts, weights=weights, plan=p)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}"


class BaseMoE(_Layer):
    """BASE layer (Lewis et al., ICML 2021; fairseq ``BaseLayer`` with one ``BaseSublayer``).

    Router: expert centroids ``expert_centroids [E, d]`` (orthogonal init, gain 0.1), affinities
    ``A = x C^T`` in fp32. In training (``module.training``) the tokens are assigned by
    :func:`moeyard.balanced_assignment` on the detached affinities: every expert takes exactly
    ``T // E`` tokens (experts ``0 .. T % E - 1`` one more), the total affinity is maximal; in eval
    each token goes to its argmax expert (greedy, causal; ties to the lower expert). Expert e is
    fairseq's residual sublayer ``v + ff2(act(ff1(LN_e(v))))`` with its own LayerNorm
    (``norm_weight[e]``, ``norm_bias[e]``, eps 1e-5) and ``ff1 / ff2`` = ``experts.gate_up_proj /
    down_proj`` (+ biases; Hugging Face v5 stacked layout), computed by :func:`moeyard.expert_ffn`
    with the routing weight ``alpha_t = sigmoid(x_t . C_e)`` (k = 1). fairseq mixes
    ``alpha * expert(x) + (1 - alpha) * x = x + alpha * ff2(act(ff1(LN_e(x))))``.

    **Returns only the delta** ``alpha_t * ff2(act(ff1(LN_e(x_t))))`` by default, like the other
    layers, so it drops into a block's MLP slot (``h + layer(norm(h))``); ``residual=True`` returns
    fairseq's full output ``x + delta`` (use it as a standalone layer, ``h = layer(h)``).

    Gradients: experts and LayerNorms as usual; ``alpha`` is differentiable w.r.t. the tokens and
    the chosen centroid (the only gradient path to ``expert_centroids``); the assignment itself is
    not. No auxiliary loss (``aux_losses`` is empty); ``last_stats`` is
    :func:`moeyard.load_stats` of the plan (in training ``tokens_per_expert`` is the balanced
    capacities, ``max_violation`` 0 when E divides T).

    Differences from fairseq, on purpose:
      * Mode switch on ``module.training``, not on ``input.requires_grad`` (fairseq's pitfall:
        there, eval under autograd balances and training under ``no_grad`` is greedy).
      * Single process: the assignment is solved over the whole local batch (all ``B * S`` tokens
        of the call); fairseq's random shuffle and all-to-all across data-parallel workers (one
        expert per worker) are distributed-only and not done here. The balanced assignment sees
        every token of the batch, so training-mode routing is not causal.
      * ``down_proj`` and its bias start at zero (fairseq zeroes only ff2's weight), so the layer
        is exactly a zero delta (``residual=True``: the identity) at initialization. The other
        weights are N(0, initializer_range^2), biases zero, LayerNorms (1, 0).

    Args:
        hidden_size, intermediate_size, num_experts: d, d_ffn (per expert), E.
        activation: ``"relu"`` (default, fairseq's ``activation_fn``) or another name of
            :data:`moeyard.ACTIVATIONS`, e.g. ``"gelu"`` or a gated one such as ``"swiglu"``
            (``gate_up_proj [E, 2I, d]``).
        expert_bias: ff1 / ff2 biases (default True, as fairseq's Linear).
        residual: return ``x + delta`` instead of the delta (default False).
        norm_eps: LayerNorm epsilon (default 1e-5).
        initializer_range: std of the expert weights' normal init (default 0.02).
        backend: the expert-compute backend, as :class:`TopKMoE`.
        ep_group: expert parallelism, as :class:`TopKMoE`: the expert MLPs are sharded, the
            centroids and the experts' LayerNorms (applied before the exchange) stay replicated.
            In training the assignment balances each rank's own batch (fairseq's ``BaseLayer``
            too solves it per worker, after shuffling tokens across workers, which moeyard does
            not do), so each expert takes ``ceil(T / E)`` rows from every rank: a sync-free
            capacity exchange and each rank's output equals the single-device layer's. Eval
            (greedy) exchanges dropless: one host sync per forward.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, *,
                 activation: str = "relu", expert_bias: bool = True, residual: bool = False,
                 norm_eps: float = 1e-5, initializer_range: float = 0.02,
                 backend: str = "auto", ep_group=None, device=None, dtype=None):
        super().__init__()
        check_sizes(hidden_size, num_experts)
        if not norm_eps > 0:
            raise ValueError(f"norm_eps={norm_eps} must be > 0")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.residual, self.norm_eps = residual, norm_eps
        self.expert_centroids = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.norm_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.norm_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.experts = _experts(ep_group, num_experts, hidden_size, intermediate_size,
                                activation, expert_bias, initializer_range, **kw, backend=backend)
        self.reset_parameters()
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    def reset_parameters(self) -> None:
        """Centroids orthogonal with gain 0.1 (fairseq), LayerNorms (1, 0), experts as
        :class:`Experts` with ``down_proj`` (and its bias) zero: a zero delta at init."""
        with torch.no_grad():
            # orthogonal_ needs a QR decomposition, which bf16/fp16 lack: init in fp32, copy
            c = torch.empty(self.expert_centroids.shape, dtype=torch.float32,
                            device=self.expert_centroids.device)
            self.expert_centroids.copy_(nn.init.orthogonal_(c, gain=0.1))
        nn.init.ones_(self.norm_weight)
        nn.init.zeros_(self.norm_bias)
        self.experts.reset_parameters()
        nn.init.zeros_(self.experts.down_proj)
        if self.experts.down_proj_bias is not None:
            nn.init.zeros_(self.experts.down_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = _tokens(self, x)
        logits = F.linear(h.float(), self.expert_centroids.float())  # [T, E] fp32
        scores = logits.detach()
        if self.training:
            experts = balanced_assignment(scores)
        else:
            experts = route(scores, 1, "none")[1]
        alpha = torch.sigmoid(logits.gather(1, experts.long()))  # [T, 1], the gate
        # sharded experts need static exchange sizes: the balanced loads fit ceil(T / E) exactly
        sharded = getattr(self.experts, "ep", None) is not None and self.experts.ep.size > 1
        capacity = -(-h.shape[0] // self.num_experts) if self.training and sharded else None
        p = plan(experts, self.num_experts, capacity)
        # expert e's LayerNorm affine per token, gathered by a one-hot product (exact, and its
        # backward is a matmul: deterministic, unlike an indexed gather's scatter-add)
        onehot = F.one_hot(experts[:, 0].long(), self.num_experts).to(h.dtype)
        affine = onehot @ torch.cat([self.norm_weight, self.norm_bias], dim=1)  # [T, 2d]
        z = F.layer_norm(h, (self.hidden_size,), eps=self.norm_eps)
        z = z * affine[:, :self.hidden_size] + affine[:, self.hidden_size:]
        out = self.experts(z, p, alpha)
        if self.residual:
            out = h + out
        self.aux_losses = {}
        self.last_stats = load_stats(p)
        report_routing(self, logits=logits, experts=experts, weights=alpha, plan=p,
                       assignment=experts)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
                f"residual={self.residual}")


class SmearMoE(_Layer):
    """SMEAR layer (Muqeeth, Liu, Raffel, TMLR 2024): Soft Merging of Experts with Adaptive Routing.

    Each *example* gets one routing distribution ``probs [B, E]`` (:class:`SmearRouter`: mean of
    the input over the sequence, LayerNorm, normalized router weights, softmax in fp32, expert
    dropout in training), and the E expert MLPs' parameters are averaged with it into one MLP that
    runs on all the example's tokens (:class:`MergedExperts`). Every expert gets a gradient from
    every example; there is no top-k, no token dropping and no load-balancing loss
    (``aux_losses`` is always empty). Cost: one MLP per example plus the merge (see
    :func:`moeyard.merged_linear`).

    ``forward(x [B, S, d], attention_mask [B, S] = None) -> [B, S, d]``, the MLP output (the
    block's residual adds it). A ``[T, d]`` input is one example of T tokens (mask ``[T]``).
    ``attention_mask`` (nonzero = real token) makes the routing input the mean over the real
    tokens only; without it the mean runs over every position, padding included, which is what the
    reference implementation does (the mask is moeyard's choice, see :class:`SmearRouter`).
    Padding positions still get an output (from their example's merged MLP).

    **Not causal** across a sequence: every token's experts depend on the whole example (the
    reference routes decoder layers on the encoder output for that reason).

    ``last_stats`` (detached): ``"probs_mean"`` [E] the average routing probability of each expert
    over the batch (after expert dropout: the mass each expert got in the merge), ``"entropy"``
    the mean routing entropy in nats (log E: uniform, 0: one expert per example).

    Args:
        hidden_size, intermediate_size, num_experts: d, I, E.
        activation: a name of :data:`moeyard.ACTIVATIONS`: ``"swiglu"`` (default, as the other
            layers), ``"silu"`` (swish, SMEAR's adapters), ``"gelu"``, ``"relu"``, ...
        expert_bias: biases in both expert projections (default False).
        expert_dropout: probability of dropping each (example, expert) pair in training, the kept
            probabilities renormalized; default 0.1, the value of SMEAR's runs (ALGORITHMS.md 3.4).
            0 turns it off; eval never drops.
        router_init_scale: initial gain of the router weight normalization (default 1e-2: near
            uniform routing at init, as the reference).
        initializer_range: std of the normal init of the expert weights (default 0.02).
        ep_group: must be None: SMEAR merges the experts' parameters for every example instead of
            sending tokens to experts, so it has no expert-parallel form (shard it with FSDP).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, *,
                 activation: str = "swiglu", expert_bias: bool = False,
                 expert_dropout: float = 0.1, router_init_scale: float = 1e-2,
                 initializer_range: float = 0.02, ep_group=None, device=None, dtype=None):
        super().__init__()
        if ep_group is not None:
            raise ValueError("SmearMoE cannot be expert-parallel (ep_group): it merges every "
                             "expert's parameters per example instead of routing tokens to "
                             "experts; shard it with FSDP instead")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.router = SmearRouter(hidden_size, num_experts, expert_dropout=expert_dropout,
                                  router_init_scale=router_init_scale, **kw)
        self.experts = MergedExperts(num_experts, hidden_size, intermediate_size, activation,
                                     expert_bias, initializer_range, **kw)
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(f"SmearMoE expects [B, S, hidden_size={self.hidden_size}] or "
                             f"[T, hidden_size] input, got shape {tuple(x.shape)}")
        xb = x if x.dim() == 3 else x.unsqueeze(0)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"attention_mask must have shape {tuple(x.shape[:-1])} (x's "
                                 f"without the last dim), got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.view(xb.shape[:-1])
        probs = self.router(xb, attention_mask)
        out = self.experts(xb, probs)
        self.aux_losses = {}
        with torch.no_grad():
            n = max(probs.shape[0], 1)
            self.last_stats = {"probs_mean": probs.sum(0) / n, "entropy": routing_entropy(probs)}
        report_routing(self, probs=probs)
        return out.view(x.shape)
