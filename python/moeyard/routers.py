"""Router modules: the router linear (fp32 math) followed by a routing op.

:class:`TopKRouter` (:func:`moeyard.route`) serves Switch (softmax, k = 1, input jitter), Mixtral /
Qwen (softmax top-k, optional renormalization) and DeepSeek-V3 (sigmoid, selection bias,
group-limited, renormalized, scaled), and with ``score="sparsemixer"``
(:func:`moeyard.sparsemixer`) GRIN / PhiMoE; :class:`ReLURouter` (:func:`moeyard.relu_route`)
serves ReMoE, :class:`TopPRouter` (:func:`moeyard.top_p_route`) dynamic top-p routing. They share
:class:`RouterLinear` (weight, init, jitter, fp32 logits), which expert-choice uses directly.
:class:`SmearRouter` routes whole examples (SMEAR).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import relu_route, route, sparsemixer, top_p_route

__all__ = ["RouterLinear", "TopKRouter", "ReLURouter", "TopPRouter", "SmearRouter"]

SCORES = ("softmax", "sigmoid", "sparsemixer")


class RouterLinear(nn.Module):
    """Router linear ``logits = x W^T`` (``weight [E, d]``, no bias, as Hugging Face v5's routers)
    computed in fp32, with optional multiplicative input jitter in training.

    ``forward(x [T, d]) -> logits [T, E]`` fp32. ``weight ~ N(0, initializer_range^2)``.
    """

    def __init__(self, hidden_size: int, num_experts: int, *, jitter_eps: float = 0.0,
                 initializer_range: float = 0.02, device=None, dtype=None):
        super().__init__()
        check_sizes(hidden_size, num_experts)
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps={jitter_eps} must be in [0, 1)")
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.jitter_eps, self.initializer_range = jitter_eps, initializer_range
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device,
                                               dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight ~ N(0, initializer_range^2)``."""
        nn.init.normal_(self.weight, std=self.initializer_range)

    def router_logits(self, x: Tensor) -> Tensor:
        xr = x.float()
        if self.training and self.jitter_eps > 0:
            xr = xr * torch.empty_like(xr).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        return F.linear(xr, self.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.router_logits(x)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
                f"jitter_eps={self.jitter_eps}")


class TopKRouter(RouterLinear):
    """Router linear ``logits = x W^T`` (``weight [E, d]``, no bias, as Hugging Face v5's routers)
    computed in fp32, then top-k gating by :func:`moeyard.route`.

    ``forward(x [T, d]) -> (logits [T, E] fp32, weights [T, k] fp32, experts [T, k] int32)``.

    Args:
        hidden_size, num_experts: d and E.
        k: experts per token, ``1 <= k <= E``. Default 1.
        score: ``"softmax"`` (default), ``"sigmoid"`` (DeepSeek-V3) or ``"sparsemixer"``: GRIN's
            SparseMixer-v2 (PhiMoE), :func:`moeyard.sparsemixer`: k = 2, experts sampled in
            training (``module.training``) with GRIN's gradient estimator, the top two in eval;
            no renormalization, scale, groups, selection bias or ``topk_before_score``.
        sparsemixer_eps: sparsemixer's window, ``jitter_eps`` of :func:`moeyard.sparsemixer`
            (PhiMoE's ``router_jitter_noise``). Default 0.01.
        generator: the ``torch.Generator`` sparsemixer draws its training noise from; None
            (default): torch's global one (which ``torch.utils.checkpoint`` restores for its
            recompute, so a recomputed forward samples the same experts; a generator of your own
            is not restored). Settable later as ``router.generator``.
        topk_before_score: softmax over the k best logits (GPT-OSS); default False.
        renormalize: weights divided by their sum (Mixtral, ``norm_topk_prob``); default False.
        scale: weights multiplied by it (DeepSeek-V3's ``routed_scaling_factor``); default 1.
        n_group, topk_group: group-limited routing (DeepSeek-V3); default 1, 1 (off).
        bias_balancing: keep a selection bias ``e_score_correction_bias`` (fp32 buffer ``[E]``,
            zeros, saved in the state dict, Hugging Face's name) for auxiliary-loss-free
            balancing, and the load ``load_since_update`` (int64 ``[E]``, not saved) that training
            forwards accumulate through :meth:`record_load` and :class:`moeyard.BiasBalancer`
            consumes. Default False.
        jitter_eps: in training, the router input is multiplied by ``Uniform(1 - eps, 1 + eps)``
            noise (Switch's input jitter; a router-only copy, the experts see x unchanged).
            Default 0 (off).
        initializer_range: std of the normal init of ``weight``; default 0.02 (Hugging Face).
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int = 1, score: str = "softmax", *,
                 topk_before_score: bool = False, renormalize: bool = False, scale: float = 1.0,
                 n_group: int = 1, topk_group: int = 1, bias_balancing: bool = False,
                 jitter_eps: float = 0.0, sparsemixer_eps: float = 0.01,
                 generator: Optional[torch.Generator] = None, initializer_range: float = 0.02,
                 device=None, dtype=None):
        _check_routing(hidden_size, num_experts, k, score, n_group, topk_group, jitter_eps)
        if score == "sparsemixer":
            _check_sparsemixer(k, topk_before_score, renormalize, scale, n_group, bias_balancing,
                               sparsemixer_eps)
        super().__init__(hidden_size, num_experts, jitter_eps=jitter_eps,
                         initializer_range=initializer_range, device=device, dtype=dtype)
        self.k, self.score = k, score
        self.sparsemixer_eps, self.generator = sparsemixer_eps, generator
        self.topk_before_score, self.renormalize, self.scale = topk_before_score, renormalize, scale
        self.n_group, self.topk_group = n_group, topk_group
        if bias_balancing:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, device=device, dtype=torch.float32))
            self.register_buffer("load_since_update",
                                 torch.zeros(num_experts, device=device, dtype=torch.int64),
                                 persistent=False)
        else:
            self.e_score_correction_bias = self.load_since_update = None

    def _apply(self, fn, recurse=True):
        # The selection bias stays fp32 under model.to(bf16) / .half() (updates of 1e-3 would
        # vanish in bf16), as Hugging Face keeps it with _keep_in_fp32_modules.
        super()._apply(fn, recurse)
        bias = self.e_score_correction_bias
        if bias is not None and bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.float()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.router_logits(x)
        if self.score == "sparsemixer":
            weights, experts = sparsemixer(logits, self.sparsemixer_eps, self.training,
                                           generator=self.generator)
            return logits, weights, experts
        weights, experts = route(logits, self.k, self.score,
                                 topk_before_score=self.topk_before_score,
                                 bias=self.e_score_correction_bias, n_group=self.n_group,
                                 topk_group=self.topk_group, renormalize=self.renormalize,
                                 scale=self.scale)
        return logits, weights, experts

    def record_load(self, counts: Tensor) -> None:
        """Add a plan's ``counts`` to ``load_since_update`` if this router balances by bias and
        this is a training forward with grad enabled (an activation-recompute pass under
        ``no_grad`` or an eval pass does not count)."""
        if self.load_since_update is not None and self.training and torch.is_grad_enabled():
            self.load_since_update.add_(counts)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.k}, "
                f"score={self.score!r}, renormalize={self.renormalize}, scale={self.scale}, "
                f"n_group={self.n_group}, topk_group={self.topk_group}, "
                f"bias_balancing={self.e_score_correction_bias is not None}, "
                f"jitter_eps={self.jitter_eps}"
                + (f", sparsemixer_eps={self.sparsemixer_eps}" if self.score == "sparsemixer"
                   else ""))


class ReLURouter(RouterLinear):
    """ReMoE router: ``gates = relu(x W^T)`` (fp32), every expert with a positive gate active.

    ``forward(x [T, d]) -> (logits [T, E] fp32, weights [T, k_max] fp32, experts [T, k_max]
    int32)`` by :func:`moeyard.relu_route`: per token its active experts, largest gate first, -1
    (weight 0) in the remaining slots. ``k_max=None`` (default) means E, exactly ReMoE; a smaller
    ``k_max`` bounds the experts per token (the smallest gates beyond it are dropped).
    ``jitter_eps`` and ``initializer_range`` as :class:`RouterLinear`.
    """

    def __init__(self, hidden_size: int, num_experts: int, k_max: Optional[int] = None, *,
                 jitter_eps: float = 0.0, initializer_range: float = 0.02, device=None,
                 dtype=None):
        super().__init__(hidden_size, num_experts, jitter_eps=jitter_eps,
                         initializer_range=initializer_range, device=device, dtype=dtype)
        if k_max is not None and not 1 <= k_max <= num_experts:
            raise ValueError(f"k_max={k_max} must be in [1, num_experts={num_experts}] or None")
        self.k_max = num_experts if k_max is None else k_max

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.router_logits(x)
        weights, experts = relu_route(logits, self.k_max)
        return logits, weights, experts

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k_max={self.k_max}"


class TopPRouter(RouterLinear):
    """Dynamic top-p router (Huang et al., ACL 2024): ``P = softmax(x W^T)`` (fp32), per token the
    experts in descending probability until their probabilities sum past ``p`` (the crossing one
    included), weighted by their raw probabilities.

    ``forward(x [T, d]) -> (logits [T, E] fp32, weights [T, k_max] fp32, experts [T, k_max]
    int32)`` by :func:`moeyard.top_p_route`: -1 (weight 0) in the slots a token does not use.
    ``p`` in (0, 1], default 0.4 (the authors' ``top_p_threshold``); ``k_max=None`` (default)
    means E, no bound, as the paper; a smaller ``k_max`` bounds the experts (and the plan's rows)
    per token. ``jitter_eps`` and ``initializer_range`` as :class:`RouterLinear`.
    """

    def __init__(self, hidden_size: int, num_experts: int, p: float = 0.4,
                 k_max: Optional[int] = None, *, jitter_eps: float = 0.0,
                 initializer_range: float = 0.02, device=None, dtype=None):
        super().__init__(hidden_size, num_experts, jitter_eps=jitter_eps,
                         initializer_range=initializer_range, device=device, dtype=dtype)
        if not 0 < p <= 1:
            raise ValueError(f"p={p} must be in (0, 1]")
        if k_max is not None and not 1 <= k_max <= num_experts:
            raise ValueError(f"k_max={k_max} must be in [1, num_experts={num_experts}] or None")
        self.p = p
        self.k_max = num_experts if k_max is None else k_max

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.router_logits(x)
        weights, experts = top_p_route(logits, self.p, self.k_max)
        return logits, weights, experts

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}, k_max={self.k_max}"


def check_sizes(hidden_size: int, num_experts: int) -> None:
    """ValueError unless the hidden size and the number of experts are >= 1."""
    if hidden_size < 1 or num_experts < 1:
        raise ValueError(f"hidden_size={hidden_size} and num_experts={num_experts} must be >= 1")


def _check_routing(hidden_size, num_experts, k, score, n_group, topk_group, jitter_eps):
    """Raise ValueError naming the first bad routing setting."""
    check_sizes(hidden_size, num_experts)
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must be >= 1 and divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"k={k} exceeds the {topk_group * (num_experts // n_group)} experts in "
                         f"topk_group={topk_group} groups of {num_experts // n_group}")
    if not 0 <= jitter_eps < 1:
        raise ValueError(f"jitter_eps={jitter_eps} must be in [0, 1)")


def _check_sparsemixer(k, topk_before_score, renormalize, scale, n_group, bias_balancing, eps):
    """Raise ValueError naming the first setting that score="sparsemixer" does not take."""
    if k != 2:
        raise ValueError(f"score='sparsemixer' routes k=2 experts per token, got k={k}")
    fixed = (("topk_before_score", topk_before_score, False), ("renormalize", renormalize, False),
             ("scale", scale, 1.0), ("n_group", n_group, 1),
             ("bias_balancing", bias_balancing, False))
    for name, value, default in fixed:
        if value != default:
            raise ValueError(f"score='sparsemixer' does not take {name}={value!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"sparsemixer_eps={eps} must be finite and >= 0")


class SmearRouter(nn.Module):
    """SMEAR's router (ALGORITHMS.md 3.2): one probability vector per example, not per token.

    ``forward(x [B, S, d], attention_mask [B, S] = None) -> probs [B, E]`` (fp32; fp64 for fp64 x):

    - ``v`` = mean of ``x`` over the sequence. The reference code averages over *all* positions,
      padding included (plain ``mean(dim=1)``); with an ``attention_mask`` (nonzero = real token)
      moeyard averages over the real tokens only, moeyard's choice (an all-padding example gets
      ``v = 0``). Without a mask every position counts, as the reference.
    - ``v = norm(v)``: a LayerNorm (affine) of the pooled input.
    - ``W_hat = weight_norm(weight)``: each expert's router vector (``weight [E, d]``, Hugging
      Face's router layout) normalized over d by a LayerNorm whose gain starts at
      ``router_init_scale`` (1e-2), so the initial logits are tiny and routing starts near uniform.
      This norm has no bias: one added to every expert's vector shifts all logits by the same
      ``v . bias``, which the softmax ignores (the reference's LayerNorm has one, never trained).
    - ``probs = softmax(v W_hat^T)``; no router bias.
    - In training with ``expert_dropout = p > 0`` each (example, expert) is dropped with
      probability p (one ``torch.rand(B, E)`` draw) and the kept probabilities renormalized as the
      reference does: ``probs = (probs * keep + 1e-10) / sum(probs * keep + 1e-10)``.

    All of it in fp32 whatever the parameters' dtype. ``weight ~ N(0, router_init_scale^2)`` as the
    reference (the LayerNorm removes its scale); the input norm starts as the identity norm (gain 1,
    bias 0), ``weight_norm``'s gain ``router_init_scale``.
    """

    def __init__(self, hidden_size: int, num_experts: int, *, expert_dropout: float = 0.1,
                 router_init_scale: float = 1e-2, device=None, dtype=None):
        super().__init__()
        check_sizes(hidden_size, num_experts)
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout={expert_dropout} must be in [0, 1)")
        if not router_init_scale > 0:
            raise ValueError(f"router_init_scale={router_init_scale} must be > 0")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.expert_dropout, self.router_init_scale = expert_dropout, router_init_scale
        self.norm = nn.LayerNorm(hidden_size, **kw)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.weight_norm = nn.LayerNorm(hidden_size, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.weight, std=self.router_init_scale)
        nn.init.constant_(self.weight_norm.weight, self.router_init_scale)

    def pooled(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The routing input ``v [B, d]`` (fp32, fp64 for fp64 x): the mean of ``x [B, S, d]`` over
        the sequence, over the positions where ``attention_mask`` is nonzero if given."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if attention_mask is None:
            return x.sum(1, dtype=acc) / max(x.shape[1], 1)
        keep = attention_mask != 0
        total = (x * keep[..., None].to(x.dtype)).sum(1, dtype=acc)  # x * 0/1 is exact
        return total / keep.sum(1, keepdim=True, dtype=acc).clamp(min=1)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        v = self.pooled(x, attention_mask)
        acc = v.dtype
        v = F.layer_norm(v, (self.hidden_size,), self.norm.weight.to(acc),
                         self.norm.bias.to(acc), self.norm.eps)
        w_hat = F.layer_norm(self.weight.to(acc), (self.hidden_size,),
                             self.weight_norm.weight.to(acc), None, self.weight_norm.eps)
        probs = torch.softmax(v @ w_hat.t(), dim=-1)
        if self.training and self.expert_dropout > 0:
            keep = torch.rand(probs.shape, device=probs.device) >= self.expert_dropout
            probs = probs * keep + 1e-10
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
                f"expert_dropout={self.expert_dropout}, "
                f"router_init_scale={self.router_init_scale}")
