"""moeyard's public ops: typed wrappers over ``torch.ops.moeyard`` and their fake kernels (so
``torch.compile`` traces them without running them). Autograd is registered in C++
(csrc/*/*_autograd.cpp) so that eager calls run no Python beyond the wrapper.

Schemas are defined once in csrc/registration.cpp; the semantics of every op are written out in
:mod:`moeyard.reference`. No op synchronizes with the host and every output shape depends only on
argument shapes and integer arguments, so all of them work under ``torch.compile(fullgraph=True)``
and inside CUDA graphs.

Plan encoding (shared by every op that consumes a routing):
  ``row_source [R]`` int32: ``t * k + j`` for the row holding token t's slot j, -1 if unused.
  ``token_row [T, k]`` int32: the row of token t's slot j, -1 if dropped or routed nowhere.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "RoutingPlan",
    "route",
    "relu_route",
    "top_p_route",
    "sparsemixer",
    "sparsemixer_noise",
    "plan",
    "expert_choice",
    "balanced_assignment",
    "permute",
    "unpermute",
    "update_expert_bias",
    "router_losses",
    "sequence_balance_loss",
    "router_entropy",
    "erc_loss",
    "load_stats",
    "max_violation",
    "expert_capacity",
    "grouped_mm",
    "expert_ffn",
    "merged_linear",
    "ACTIVATIONS",
    "EXPERTS_BACKENDS",
    "experts_backend_table",
]

_ops = torch.ops.moeyard


class RoutingPlan(NamedTuple):
    """Where every (token, slot) goes in the permuted buffer. All tensors int32, on the device.

    counts [E]       assignments per expert before capacity drops (the load)
    offsets [E+1]    exclusive cumsum of the rows each expert kept
    row_source [R]   t*k + j of each row's assignment, -1 for unused rows
    token_row [T,k]  row of each assignment, -1 if dropped or routed to no expert
    capacity         None: dropless, R = T*k, expert e's rows start at offsets[e];
                     C: R = E*C, expert e's rows start at e*C (fixed stride)
    """

    counts: Tensor
    offsets: Tensor
    row_source: Tensor
    token_row: Tensor
    capacity: Optional[int] = None

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        return self.row_source.shape[0]

    @property
    def row_token(self) -> Tensor:
        """Source token of each row (-1 unused)."""
        k = self.token_row.shape[1]
        return torch.where(self.row_source >= 0, self.row_source // k, -1)

    @property
    def row_slot(self) -> Tensor:
        """Slot (0..k-1) of each row's assignment (-1 unused)."""
        k = self.token_row.shape[1]
        return torch.where(self.row_source >= 0, self.row_source % k, -1)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_same_device(args: dict) -> None:
    """Every tensor among an op's arguments ``args`` (name -> value; fake kernels pass
    ``locals()`` as their first statement) is on one device, else a RuntimeError naming the first
    tensor and the first one elsewhere, with their devices, as the C++ ``check_same_device`` does
    on the CPU and CUDA paths.

    Every fake kernel calls this first. A fake kernel is also the op's Meta kernel, which the
    dispatcher picks as soon as one argument is a meta tensor, so without the check a CPU tensor
    mixed with a meta one would pass, returning uninitialized memory (or, for the in-place
    update_expert_bias, doing nothing). Unlike torch's elementwise ops there is no exception for
    0-dim CPU tensors: no moeyard op takes a scalar tensor, so a 0-dim tensor elsewhere is a
    mistake too. Under torch.compile the fake tensors carry their real tensors' devices, so a
    traced call fails where the eager call would."""
    first = None
    for name, value in args.items():
        if not isinstance(value, Tensor):
            continue
        if first is None:
            first = (name, value.device)
        elif value.device != first[1]:
            raise RuntimeError(f"moeyard: {first[0]} ({first[1]}) and {name} ({value.device}) "
                               "must be on the same device")


# ------------------------------------------------------------------------------------- route


def route(
    logits: Tensor,
    k: int,
    score: str = "softmax",
    *,
    topk_before_score: bool = False,
    bias: Optional[Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = False,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Top-k routing in one kernel. Returns ``(weights [T,k], experts [T,k] int32)``, best first.

    Args:
        logits: router logits ``[T, E]`` (any float dtype; math in fp32, fp64 for fp64).
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` (Switch, Mixtral, Qwen), ``"sigmoid"`` (DeepSeek-V3) or ``"none"``.
        topk_before_score: pick the top-k logits, then softmax over those k (Mixtral, GPT-OSS);
            otherwise score all experts, then pick (Switch, Qwen, DeepSeek).
        bias: fp32 ``[E]`` added to the selection values only (auxiliary-loss-free balancing):
            it changes which experts are picked, never their weights.
        n_group, topk_group: group-limited routing (DeepSeek-V3): only experts in the
            ``topk_group`` groups with the best top-2 sums may be picked.
        renormalize: divide the k weights by their sum (Mixtral, ``norm_topk_prob``).
        scale: multiply the weights (DeepSeek-V3's ``routed_scaling_factor``).

    Ties go to the lower expert id; NaN logits rank below every number and make that token's
    softmax weights NaN (as ``torch.softmax`` does); expert ids are always valid and distinct.
    Differentiable w.r.t. ``logits`` through the weights.
    """
    return _ops.route.default(logits, k, score, topk_before_score, bias, n_group, topk_group,
                              renormalize, scale)


@torch.library.register_fake("moeyard::route")
def _route_fake(logits, k, score="softmax", topk_before_score=False, bias=None, n_group=1,
                topk_group=1, renormalize=False, scale=1.0):
    _check_same_device(locals())
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
    torch._check(1 <= k <= logits.shape[1], lambda: f"k={k} must be in [1, E={logits.shape[1]}]")
    T = logits.shape[0]
    return (logits.new_empty((T, k), dtype=_acc_dtype(logits)),
            logits.new_empty((T, k), dtype=torch.int32))


def relu_route(logits: Tensor, k_max: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """ReMoE routing: gates ``relu(logits)``; per token the (up to) ``k_max`` largest positive gates
    as ``weights [T,k_max]`` and their experts, ``-1`` (weight 0) in inactive slots.

    ``k_max=None`` means E: every active expert is kept, exactly ReMoE. A smaller ``k_max`` bounds
    the work per token and drops the smallest gates beyond it. Differentiable w.r.t. ``logits``.
    """
    return _ops.relu_route.default(logits, logits.shape[1] if k_max is None else k_max)


@torch.library.register_fake("moeyard::relu_route")
def _relu_route_fake(logits, k_max):
    _check_same_device(locals())
    return _route_fake(logits, k_max)


def top_p_route(logits: Tensor, p: float, k_max: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Dynamic top-p routing (Huang et al., "Harder Tasks Need More Experts", ACL 2024): per token
    the experts in descending softmax probability until their probabilities sum past ``p``.

    Returns ``(weights [T,k_max], experts [T,k_max] int32)``, best first: slot j holds the j-th
    most probable expert while the probabilities of slots 0..j-1 sum to at most ``p`` (the expert
    that crosses ``p`` is included, as the authors' code does); the other slots have expert -1 and
    weight 0, the format :func:`plan` and :func:`expert_ffn` take. Weights are the raw softmax
    probabilities (not renormalized, as in the paper's code). A token keeps at least one and at
    most ``k_max`` experts; ``k_max=None`` means E (no bound; the plan then has ``T*E`` rows).

    Args:
        logits: router logits ``[T, E]`` (any float dtype; math in fp32, fp64 for fp64).
        p: the threshold, ``0 < p <= 1`` (the paper's default 0.4); ``p = 1`` keeps ``k_max``.
        k_max: bound on the experts per token, ``1 <= k_max <= E``, or None (E).

    Experts are ordered by their logits (exact, no rounding ties): ties to the lower expert id.
    The running sum is accumulated in slot order in fp32 (fp64 for fp64) and compared with ``p``
    in that dtype. A NaN or +inf logit makes the token's probabilities NaN (as
    ``torch.softmax``): it keeps one expert (the best by the order above, NaN last) with weight
    NaN. Differentiable w.r.t. ``logits`` through the weights (the selection is piecewise
    constant). No host synchronization; the output shape depends only on T and k_max.
    """
    return _ops.top_p_route.default(logits, p, logits.shape[1] if k_max is None else k_max)


@torch.library.register_fake("moeyard::top_p_route")
def _top_p_route_fake(logits, p, k_max):
    _check_same_device(locals())
    torch._check(0 < p <= 1, lambda: f"p must be in (0, 1], got p={p}")
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
    torch._check(1 <= k_max <= logits.shape[1],
                 lambda: f"k_max={k_max} must be in [1, E={logits.shape[1]}]")
    T = logits.shape[0]
    return (logits.new_empty((T, k_max), dtype=_acc_dtype(logits)),
            logits.new_empty((T, k_max), dtype=torch.int32))


def sparsemixer(logits: Tensor, jitter_eps: float = 0.01, training: bool = False, *,
                generator: Optional[torch.Generator] = None,
                noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """GRIN's SparseMixer-v2 routing (Liu et al. 2024, arXiv 2409.12136; PhiMoE in transformers):
    two experts per token. Returns ``(weights [T,2], experts [T,2] int32)``, weights fp32 (fp64
    for fp64 logits), not renormalized.

    Slot 1 looks at every expert, slot 2 at every expert but slot 1's. In each slot, with ``m``
    the largest candidate logit, the experts with ``(m - z) / max(|z|, m) > 2 * jitter_eps`` are
    masked out (the sparsity window) and ``p`` is the softmax over the rest.

    Eval (``training=False``): the slot takes its largest logit (ties to the lower id), weight
    ``p[e]``; the weights are a differentiable function of the logits.

    Training: the slot samples ``e`` from ``p`` (Gumbel-max over the window) and its weight is
    ``p[e]``, times 0.3333 when ``e`` is not the slot's argmax and the slot's uniform draw is at
    most 0.75 (Heun's third-order midpoint). The gradient is GRIN's estimate, not the
    derivative of that forward: ``d weights[j] / d logits = p_j[e_j] * (onehot(e_j) - p_j)``
    (the 0.3333 factor is ignored), the same formula as in eval.

    Randomness is explicit: ``noise [T, 2, E + 1]`` fp32 holds, per token and slot, the E Gumbel
    perturbations then the uniform draw (see :func:`sparsemixer_noise`); given ``noise`` the op is
    deterministic and CPU and CUDA agree. With ``training=True`` and no ``noise`` it is drawn from
    ``generator`` (default: torch's global generator of the logits' device). ``noise`` with
    ``training=False`` is a ValueError.

    NaN logits rank below every number; a token with a NaN (or +inf) logit gets NaN weights,
    as in :func:`route`. The two experts are always valid and distinct. Differentiable w.r.t.
    ``logits`` (once: the estimator is computed by its own op, which has no derivative).
    """
    if noise is not None and not training:
        raise ValueError("sparsemixer: noise is only used in training (training=True)")
    if training and noise is None and logits.dim() == 2:
        noise = sparsemixer_noise(logits.shape[0], logits.shape[1], logits.device, generator)
    return _ops.sparsemixer.default(logits, jitter_eps, noise)


def sparsemixer_noise(num_tokens: int, num_experts: int, device=None,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """The random draws of one training :func:`sparsemixer` call: ``[T, 2, E + 1]`` fp32 where
    ``[t, j, :E]`` are Gumbel(0, 1) perturbations ``-log(Exponential(1))`` (as transformers'
    PhiMoE draws them) and ``[t, j, E]`` is ``Uniform[0, 1)``, from ``generator`` (default the
    device's global generator)."""
    noise = torch.empty(num_tokens, 2, num_experts + 1, device=device)
    noise[..., :num_experts].exponential_(generator=generator).log_().neg_()
    noise[..., num_experts].uniform_(generator=generator)
    return noise


@torch.library.register_fake("moeyard::sparsemixer")
def _sparsemixer_fake(logits, jitter_eps=0.01, noise=None):
    _check_same_device(locals())
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
    torch._check(logits.shape[1] >= 2,
                 lambda: f"sparsemixer needs at least 2 experts, got E={logits.shape[1]}")
    torch._check(math.isfinite(jitter_eps) and jitter_eps >= 0,
                 lambda: f"jitter_eps={jitter_eps} must be finite and >= 0")
    if noise is not None:
        T, E = logits.shape
        torch._check(noise.dtype == torch.float32, lambda: f"noise must be fp32, got {noise.dtype}")
        torch._check(noise.shape == (T, 2, E + 1),
                     lambda: f"noise must have shape [T, 2, E + 1], got {tuple(noise.shape)}")
    return _route_fake(logits, 2)


@torch.library.register_fake("moeyard::_sparsemixer_backward")
def _sparsemixer_backward_fake(grad, logits, experts, jitter_eps):
    _check_same_device(locals())
    torch._check(logits.dim() == 2 and grad.dim() == 2 and experts.dim() == 2,
                 lambda: "grad, logits and experts must be 2-D")
    return logits.new_empty(logits.shape)


# -------------------------------------------------------------------------------------- plan


def plan(
    experts: Tensor,
    num_experts: int,
    capacity: Optional[int] = None,
    drop_policy: str = "position",
    weights: Optional[Tensor] = None,
) -> RoutingPlan:
    """Dispatch plan of a routing ``experts [T,k]`` (int32, or int64 as Hugging Face's routers
    return it: read as it is, never converted; ``-1`` = no expert). The plan is int32.

    ``capacity=None`` is dropless (``T*k`` rows). With a capacity C each expert keeps at most C
    assignments (``E*C`` rows, fixed stride), chosen by ``drop_policy``: ``"position"`` (every
    first choice before any second choice, earlier tokens first: Switch/GShard) or ``"score"``
    (tokens ordered by their best weight: Batch Prioritized Routing; needs ``weights``).
    No host synchronization: all sizes follow from T, k, E and C.
    On CPU, expert ids outside ``[-1, E)`` raise; on CUDA (where checking them would need a host
    sync) they are treated as -1.
    """
    counts, offsets, row_source, token_row = _ops.plan.default(experts, num_experts, capacity,
                                                               drop_policy, weights)
    return RoutingPlan(counts, offsets, row_source, token_row, capacity)


def _check_expert_ids(experts):
    torch._check(experts.dtype in (torch.int32, torch.int64),
                 lambda: f"experts must be int32 or int64 expert ids, got {experts.dtype}")


def _plan_shapes(experts, num_experts, capacity):
    T, k = experts.shape
    R = T * k if capacity is None else num_experts * capacity
    i32 = dict(dtype=torch.int32)
    return (experts.new_empty((num_experts,), **i32), experts.new_empty((num_experts + 1,), **i32),
            experts.new_empty((R,), **i32), experts.new_empty((T, k), **i32))


@torch.library.register_fake("moeyard::plan")
def _plan_fake(experts, num_experts, capacity=None, drop_policy="position", weights=None):
    _check_same_device(locals())
    torch._check(experts.dim() == 2, lambda: "experts must be 2-D")
    _check_expert_ids(experts)
    torch._check(num_experts >= 1, lambda: f"num_experts={num_experts} must be >= 1")
    torch._check(capacity is None or capacity >= 0, lambda: f"capacity={capacity} must be >= 0")
    return _plan_shapes(experts, num_experts, capacity)


def expert_choice(scores: Tensor, capacity: int) -> tuple[Tensor, Tensor, RoutingPlan]:
    """Expert-choice routing: each expert takes the ``capacity`` tokens it scores highest.

    Returns ``(weights [T,E], experts [T,E], plan)``: per token, the experts that took it (ascending
    id, then -1) and their scores as combine weights; the plan has ``E*C`` rows, expert e's in its
    preference order. Loads are balanced by construction; a token may get no expert. Not causal:
    do not use it in autoregressive decoding. Differentiable w.r.t. ``scores``.
    """
    weights, experts, counts, offsets, row_source, token_row = _ops.expert_choice.default(
        scores, capacity)
    return weights, experts, RoutingPlan(counts, offsets, row_source, token_row, capacity)


@torch.library.register_fake("moeyard::expert_choice")
def _expert_choice_fake(scores, capacity):
    _check_same_device(locals())
    torch._check(scores.dim() == 2, lambda: "scores must be 2-D")
    torch._check(capacity >= 0, lambda: f"capacity={capacity} must be >= 0")
    T, E = scores.shape
    counts, offsets, row_source, _ = _plan_shapes(scores.new_empty((T, E), dtype=torch.int32), E,
                                                  capacity)
    return (scores.new_empty((T, E), dtype=_acc_dtype(scores)),
            scores.new_empty((T, E), dtype=torch.int32), counts, offsets, row_source,
            scores.new_empty((T, E), dtype=torch.int32))


def balanced_assignment(scores: Tensor, max_rounds: int = 1 << 16) -> Tensor:
    """BASE-layer routing (Lewis et al. 2021): the balanced linear assignment of tokens to experts.

    Returns ``experts [T, 1]`` int32 (the ``experts [T, k]`` format of :func:`route` with k = 1,
    ready for :func:`plan`) maximizing ``sum_t scores[t, experts[t]]`` subject to exact balance:
    with ``m = T // E`` and ``r = T % E``, experts ``0 .. r-1`` take ``m + 1`` tokens and the
    others ``m`` (for ``T < E``: experts ``0 .. T-1`` take one token each). T = 0 gives ``[0, 1]``;
    E = 1 or T = 1 puts every token on expert 0.

    Args:
        scores: ``[T, E]`` affinities (fp32, fp64, fp16 or bf16; BASE: ``h @ centroids.T`` in fp32).
            NaN and +-inf count as the smallest finite score (all non-finite: all equal).
        max_rounds: bound on the auction's bidding rounds over all its phases (default 65536;
            real-valued scores typically need hundreds, heavily tied ones up to ~10^4); when
            reached, the tokens still unassigned take, in ascending order, their best expert (at
            the current prices) that has room left, ties to the lowest expert: still exactly
            balanced, no longer guaranteed optimal. ``0`` gives greedy-with-capacity in token
            order, for all-equal scores too (token t to the lowest expert with room: expert 0
            takes the first tokens, then expert 1, ...; the ``t mod E'`` below is the auction's
            first round, which needs ``max_rounds >= 1``).

    Algorithm: forward auction with epsilon-scaling (Bertsekas), tokens bidding for experts with
    one price per expert, on the scores rounded to a grid of 2^24 steps of their range
    (``q = 2^shift``, the smallest power of two with ``(max - min) / q <= 2^24``): exactly optimal
    on that grid (final epsilon below one grid step / T), hence exactly optimal whenever the scores
    lie on it (e.g. integer scores spanning <= 2^24) and within ``T * q`` of the optimum otherwise.
    Ties: among equally good experts token t bids for the first in the cyclic order
    ``t mod E', t+1 mod E', ...`` (``E' = min(T, E)``; all-equal scores give ``t -> t mod E'``), an
    expert keeps the lower token of equal bids. Deterministic; CPU and CUDA return the same
    assignment. Each round costs ``O(E)`` per token still unassigned; on CUDA the whole auction
    runs in one thread block, with no host synchronization. Not differentiable (an integer
    output); the steps are in :func:`moeyard.reference.balanced_assignment`.
    Not causal: a token's expert depends on the whole batch (use greedy argmax at inference).
    """
    return _ops.balanced_assignment.default(scores, max_rounds)


@torch.library.register_fake("moeyard::balanced_assignment")
def _balanced_assignment_fake(scores, max_rounds=1 << 16):
    _check_same_device(locals())
    torch._check(scores.dim() == 2, lambda: f"scores must be 2-D, got {scores.dim()}-D")
    torch._check(scores.shape[1] >= 1, lambda: "scores must have at least one expert column")
    torch._check(max_rounds >= 0, lambda: f"max_rounds={max_rounds} must be >= 0")
    return scores.new_empty((scores.shape[0], 1), dtype=torch.int32)


# ------------------------------------------------------------------------------- permutation


def permute(x: Tensor, plan: RoutingPlan) -> Tensor:
    """Rows of ``x [T,d]`` in plan order: ``[R, d]``, zero rows where the plan has none.
    Differentiable w.r.t. ``x`` (its gradient gathers each token's rows back)."""
    return _ops.permute.default(x, plan.row_source, plan.token_row)


@torch.library.register_fake("moeyard::permute")
def _permute_fake(x, row_source, token_row):
    _check_same_device(locals())
    torch._check(x.dim() == 2, lambda: "x must be 2-D")
    return x.new_empty((row_source.shape[0], x.shape[1]))


def unpermute(y: Tensor, plan: RoutingPlan, weights: Optional[Tensor] = None) -> Tensor:
    """Combine rows back to tokens: ``out[t] = sum_j weights[t,j] * y[token_row[t,j]]`` in fp32,
    slot order, gathered (deterministic, no atomics); dropped slots add nothing. ``[T, d]`` in
    ``y``'s dtype. Differentiable w.r.t. ``y`` and ``weights``."""
    return _ops.unpermute.default(y, plan.row_source, plan.token_row, weights)


@torch.library.register_fake("moeyard::unpermute")
def _unpermute_fake(y, row_source, token_row, weights=None):
    _check_same_device(locals())
    torch._check(y.dim() == 2, lambda: "y must be 2-D")
    return y.new_empty((token_row.shape[0], y.shape[1]))


@torch.library.register_fake("moeyard::unpermute_backward")
def _unpermute_backward_fake(grad, y, row_source, token_row, weights, compute_grad_weights):
    _check_same_device(locals())
    wdtype = weights.dtype if weights is not None else torch.float32
    gw_shape = tuple(token_row.shape) if compute_grad_weights else (0,)
    return y.new_empty(y.shape), grad.new_empty(gw_shape, dtype=wdtype)


# ----------------------------------------------------------------------------------- balance


def update_expert_bias(bias: Tensor, load: Tensor, rate: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing step, in place: ``bias += rate * sign(mean(load) - load)``.

    ``bias`` is the fp32 ``[E]`` selection bias passed to :func:`route`; ``load`` the tokens per
    expert of this step (e.g. ``plan.counts``, summed over micro-batches and, for data parallel,
    all-reduced before the call). Outside autograd; no host sync."""
    _ops.update_expert_bias.default(bias, load, rate)


@torch.library.register_fake("moeyard::update_expert_bias")
def _update_expert_bias_fake(bias, load, rate):
    _check_same_device(locals())
    return None


def router_losses(logits: Tensor, counts: Tensor, k: int,
                  score: str = "softmax") -> tuple[Tensor, Tensor]:
    """Switch load-balancing loss and router z-loss, in one pass over the logits.

    ``balance = E * sum_e f_e * P_e`` with ``f_e = counts_e / (T*k)`` (pass the pre-drop
    ``plan.counts``) and ``P`` the mean over tokens of the router's scores: ``score="softmax"``
    the softmax of the logits; ``"sigmoid"`` the sigmoid affinities normalized per token,
    ``sigmoid(z) / (sum_e sigmoid(z) + 1e-20)`` (DeepSeek-V3 eq. 19-20, Loss-Free Balancing's
    baseline, Megatron with a sigmoid router). 1 at perfect balance for any k (Hugging Face's
    ``load_balancing_loss_func`` reports k times this). ``z = mean_t logsumexp(logits_t)^2``.
    Both differentiable w.r.t. ``logits``; multiply by your coefficients (Switch: 1e-2, 1e-3)."""
    return _ops.router_losses.default(logits, counts, k, score)


@torch.library.register_fake("moeyard::router_losses")
def _router_losses_fake(logits, counts, k, score="softmax"):
    _check_same_device(locals())
    torch._check(score in ("softmax", "sigmoid"),
                 lambda: f"router_losses score must be 'softmax' or 'sigmoid', got {score!r}")
    dt = _acc_dtype(logits)
    return logits.new_empty((), dtype=dt), logits.new_empty((), dtype=dt)


def sequence_balance_loss(scores: Tensor, experts: Tensor, num_sequences: int) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, without its alpha (V3: 1e-4).

    ``scores [N,E]`` are the affinities (sigmoid), ``experts [N,k]`` (int32 or int64) the plain
    top-k of them (DeepSeek/Megatron use no bias and no group limit here), tokens grouped as
    ``num_sequences`` consecutive sequences. 1 at perfect balance with uniform scores.
    Differentiable w.r.t. ``scores``."""
    return _ops.sequence_balance_loss.default(scores, experts, num_sequences)


@torch.library.register_fake("moeyard::sequence_balance_loss")
def _sequence_balance_loss_fake(scores, experts, num_sequences):
    _check_same_device(locals())
    _check_expert_ids(experts)
    return scores.new_empty((), dtype=_acc_dtype(scores))


def router_entropy(logits: Tensor) -> Tensor:
    """Mean over tokens of the routing entropy ``-sum_e P_e log P_e``, ``P = softmax(logits)``
    (nats: ``log E`` for uniform routing, 0 when one expert has all the mass); 0 for T = 0.

    The dynamic loss of top-p routing (Huang et al., ACL 2024): with :func:`top_p_route` a flat
    distribution needs many experts to reach ``p``, so penalizing the entropy keeps the experts per
    token down. Differentiable w.r.t. ``logits``; computed in fp32 (fp64 for fp64). A probability
    that underflows to 0 adds 0 (``0 log 0 = 0``) and no gradient. A handful of elementwise torch
    ops on ``[T, E]`` (the same reads as :func:`router_losses`; no kernel of its own).
    """
    z = logits.to(_acc_dtype(logits))
    if z.shape[0] == 0:
        return z.sum() * 0
    # clamping the log at the dtype's lowest finite value keeps 0 * log 0 (and its gradient) at 0
    logp = torch.log_softmax(z, dim=-1).clamp(min=torch.finfo(z.dtype).min)
    return -(logp.exp() * logp).sum(-1).mean()


def erc_loss(router_weight: Tensor, gate_weight: Tensor, alpha: float = 1.0, *,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Expert-router coupling (ERC) loss (Lv, Ma, Ma, Qiao, ICLR 2026, arXiv 2512.23447, §3).

    Each router row ``R[i]`` is the centre of the tokens routed to expert i; a perturbed copy
    ``R~[i] = R[i] * delta_i`` (elementwise, ``delta_i ~ U(1 - eps_i, 1 + eps_i)^d``,
    ``eps_i = ||R[i] - R[j]|| / (2 ||R[i]||)`` with j the nearest other row: Eq. 4 at its bound,
    §3.2) is a proxy token for those tokens. ``M[i, j] = ||R~[i] W_g^j||`` is the norm of expert
    j's input projection of proxy i (``[E, E]``), and (Eq. 3)

        L = 1/E^2 sum_i sum_{j != i} max(M[i,j] - alpha M[i,i], 0) + max(M[j,i] - alpha M[i,i], 0)

    asks every proxy to activate its own expert most (Constraint 1) and every expert to respond
    most to its own proxy (Constraint 2).

    Args:
        router_weight: ``R [E, d]`` (:class:`moeyard.TopKRouter`'s ``weight``).
        gate_weight: ``W_g [E, D, d]`` in nn.Linear layout: row ``r`` of expert j is its r-th
            input unit. For moeyard's experts pass :attr:`moeyard.Experts.gate_weight` (the gate
            rows of ``gate_up_proj`` for gated activations, all of it for ungated ones).
        alpha: the coupling margin (paper: alpha in [0, 1], default 1; 0.5 was best for its
            n = 256 model); must be >= 0.
        generator: the ``torch.Generator`` that draws ``delta`` (one ``rand`` of ``[E, d]``):
            the loss is deterministic given its state. None: torch's default generator. Drawn on
            the generator's device and moved to R's (keep it on R's device to avoid the copy).

    The noise level and ``delta`` carry no gradient (the paper's pseudocode, its Figure 8, draws
    them under ``torch.no_grad``); the loss is differentiable w.r.t. ``R`` (through
    ``R~ = R * delta``) and ``W_g``. Routing itself keeps the clean ``R``. Math in fp32 (fp64 for
    fp64 R). Cost ``2 E^2 D d`` FLOPs and an ``[E, E, D]`` intermediate, independent of the number
    of tokens: a torch composition (one batched matmul and a norm), which is what a kernel of its
    own would run anyway. A zero row of R, or E = 1, gets no noise (``eps = 0``); E = 1 gives 0.
    """
    if router_weight.dim() != 2 or gate_weight.dim() != 3:
        raise ValueError(f"router_weight must be [E, d] and gate_weight [E, D, d], got shapes "
                         f"{tuple(router_weight.shape)} and {tuple(gate_weight.shape)}")
    E, d = router_weight.shape
    if gate_weight.shape[0] != E or gate_weight.shape[2] != d:
        raise ValueError(f"gate_weight must be [E={E}, D, d={d}], got {tuple(gate_weight.shape)}")
    if not alpha >= 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be finite and >= 0")
    acc = _acc_dtype(router_weight)
    R, W = router_weight.to(acc), gate_weight.to(acc)
    with torch.no_grad():
        dist = torch.cdist(R[None], R[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
        dist.fill_diagonal_(math.inf)
        # E = 1 (no other centre: inf) and zero rows (0 / 0 or x / 0) get no noise
        eps = torch.nan_to_num(dist.min(dim=1).values / (2 * R.norm(dim=1)), nan=0.0, posinf=0.0)
        dev = generator.device if generator is not None else R.device
        u = torch.rand(R.shape, generator=generator, device=dev, dtype=acc).to(R.device)
        delta = 1 - eps[:, None] + 2 * eps[:, None] * u
    proxy = R * delta
    # M[i, j] = ||W_g^j proxy_i||: one [E, E, D] product (experts j outer), normed over D
    M = torch.linalg.vector_norm(torch.matmul(proxy, W.transpose(1, 2)), dim=-1).t()
    diag = M.diagonal()
    row = (M - alpha * diag[:, None]).clamp(min=0)  # max(M[i,j] - alpha M[i,i], 0)
    col = (M - alpha * diag[None, :]).clamp(min=0)  # max(M[i,j] - alpha M[j,j], 0): Eq. 3's 2nd
    off = ~torch.eye(E, dtype=torch.bool, device=M.device)
    return torch.where(off, row + col, torch.zeros_like(M)).sum() / (E * E)


def load_stats(plan: RoutingPlan) -> dict[str, Tensor]:
    """Load statistics of a plan, as device tensors (no sync): ``tokens_per_expert`` (pre-drop),
    ``max_violation`` (:func:`max_violation` of it) and ``dropped_fraction`` (assignments dropped
    by the capacity)."""
    load = plan.counts.float()
    total = load.sum()
    kept = plan.offsets[-1].float()
    return {
        "tokens_per_expert": plan.counts,
        "max_violation": max_violation(load),
        "dropped_fraction": (total - kept) / total.clamp(min=1),
    }


def max_violation(load: Tensor) -> Tensor:
    """DeepSeek's MaxVio of per-expert loads ``load [..., E]``: ``(max_e load - mean_e load) /
    mean_e load`` over the last dim, fp32 ``[...]`` (0 when balanced; 0 for no load at all). Of a
    batch's counts it is the batch MaxVio; of counts summed over batches, the global one."""
    load = load.float()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.clamp(min=1e-20)


def expert_capacity(num_tokens: int, num_experts: int, k: int = 1, capacity_factor: float = 1.25,
                    min_capacity: int = 4) -> int:
    """Capacity per expert ``max(ceil(T * k / E * capacity_factor), min_capacity)`` (Megatron's
    formula; with k = 1 Switch's). A Python int: capacities are static, so shapes stay static."""
    return max(int(math.ceil(num_tokens * k / num_experts * capacity_factor)), min_capacity)


# ------------------------------------------------------------------------------ expert compute

from .reference import ACTIVATIONS  # noqa: E402  (the one table of the activations, by name)
from .reference import unknown_activation  # noqa: E402

EXPERTS_BACKENDS = ("auto", "grouped_mm", "moeyard")


def experts_backend_table() -> dict:
    """How ``backend="auto"`` picks the expert-compute backend of :func:`grouped_mm` and
    :func:`expert_ffn`: ``rules`` (device, compute-capability range, dtype -> backend, with the run
    that decided each), ``devices`` (the choice per dtype on the CPU and each visible GPU) and the
    ``MOEYARD_EXPERTS_BACKEND`` override. The table lives in csrc/experts/backend.cpp."""
    return json.loads(_ops._experts_backend_table())


def _check_backend(backend):
    torch._check(backend in EXPERTS_BACKENDS,
                 lambda: f"backend must be one of {EXPERTS_BACKENDS}, got {backend!r}")


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, a_index: Optional[Tensor] = None,
               capacity: Optional[int] = None, *, backend: str = "auto") -> Tensor:
    """Grouped matrix product: ``out[r] = a[src(r)] @ b[e]`` for the rows r of expert e; ``[R, N]``.

    Args:
        a: ``[A, K]`` rows (fp32, fp16 or bf16; fp64 on CPU).
        b: ``[E, K, N]`` in a's dtype. Either memory order works without a copy: row-major
            ``[E, K, N]``, or ``w.transpose(1, 2)`` of an ``[E, N, K]`` nn.Linear-style weight (how
            Hugging Face v5 stores experts).
        offsets: ``[E+1]`` int32 on a's device (e.g. ``plan.offsets``): expert e owns rows
            ``offsets[e]..offsets[e+1]``. Read on the device: no host synchronization.
        a_index: optional ``[R]`` int32: row r reads ``a[a_index[r]]`` (fuses a gather such as a
            permutation; -1 reads a zero row). Without it R = A and row r reads ``a[r]``.
        capacity: fixed-stride layout (``plan.capacity``): expert e owns rows
            ``e*C .. e*C + offsets[e+1] - offsets[e]``; R must be ``E*C``; the rows past each
            expert's count are zero in the output.
        backend: ``"auto"`` (default), ``"grouped_mm"`` or ``"moeyard"``: see :func:`expert_ffn`.

    Accumulates in fp32. Differentiable w.r.t. ``a`` and ``b``: ``grad_a`` sums the rows that read
    the same source row in fp32 in row order (deterministic), ``grad_b`` has b's memory order.
    """
    return _ops.grouped_mm.default(a, b, offsets, a_index, capacity, backend)


def _grouped_rows(a, a_index):
    return a.shape[0] if a_index is None else a_index.shape[0]


@torch.library.register_fake("moeyard::grouped_mm")
def _grouped_mm_fake(a, b, offsets, a_index=None, capacity=None, backend="auto"):
    _check_same_device(locals())
    _check_backend(backend)
    torch._check(a.dim() == 2 and b.dim() == 3, lambda: "a must be 2-D and b 3-D")
    torch._check(a.shape[1] == b.shape[1], lambda: f"a has K={a.shape[1]}, b has K={b.shape[1]}")
    return a.new_empty((_grouped_rows(a, a_index), b.shape[2]))


@torch.library.register_fake("moeyard::grouped_mm_backward")
def _grouped_mm_backward_fake(grad, a, b, offsets, a_index, capacity, need_a, need_b,
                              backend="auto"):
    _check_same_device(locals())
    _check_backend(backend)
    return (a.new_empty(a.shape if need_a else (0,)),
            torch.empty_like(b) if need_b else b.new_empty((0,)))


def expert_ffn(
    x: Tensor,
    plan: RoutingPlan,
    weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    gate_up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
    activation: str = "swiglu",
    layout: str = "linear",
    *,
    backend: str = "auto",
) -> Tensor:
    """The routed experts' MLP and the combine, as one op:
    ``y[t] = sum_j weights[t,j] * (act(x[t] @ W1[e] + b1[e]) @ W2[e] + b2[e])`` over token t's
    slots j that have a row in ``plan`` (e = that row's expert); ``[T, H]`` in x's dtype.

    Args:
        x: ``[T, H]`` tokens. weights: ``[T, k]`` routing weights (e.g. from :func:`route`).
        gate_up, down: expert weights in x's dtype. ``layout="linear"`` (Hugging Face v5 Mixtral,
            Qwen, OLMoE, DeepSeek: nn.Linear order) takes ``gate_up [E, N1, H]``,
            ``down [E, H, I]``; ``layout="matmul"`` (GPT-OSS) takes ``gate_up [E, H, N1]``,
            ``down [E, I, H]``. N1 = 2I for the gated activations, else I. Never copied.
        gate_up_bias ``[E, N1]``, down_bias ``[E, H]``: optional (GPT-OSS has both).
        activation: a name of :data:`moeyard.ACTIVATIONS` (:mod:`moeyard.reference` defines each):
            ungated ``"none"``, ``"silu"``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"``,
            ``"relu2"`` (relu squared), ``"quick_gelu"`` (``x * sigmoid(1.702 x)``); gated on the
            two halves ``[gate | up]`` of N1, ``act(gate) * up``: ``"swiglu"`` (silu),
            ``"geglu"``, ``"geglu_tanh"``, ``"reglu"``, ``"relu2_glu"``, ``"quick_geglu"``;
            ``"swiglu_oss"`` (GPT-OSS: interleaved gate/up, clamped at 7,
            ``(up + 1) * gate * sigmoid(1.702 gate)``).
        backend: which code computes the products (the result is the same up to rounding):
            ``"moeyard"``: moeyard's own grouped GEMM (any dtype, any GPU, any width; reads x's
            rows through the plan inside the GEMM, activation in its epilogue).
            ``"grouped_mm"``: torch's grouped GEMM (CUTLASS, bf16 on compute capability 9.x/10.x
            for dropless plans; ``bmm`` for capacity plans; a loop of ``mm`` on the CPU) around
            moeyard's gather, activation and combine kernels. Needs rows that are 16-byte aligned
            (widths a multiple of 8 in bf16/fp16, 4 in fp32); never float64.
            ``"auto"`` (default): the table :func:`experts_backend_table` names for the device
            and dtype; moeyard's kernel, with a one-time warning, where torch's cannot serve the
            inputs. ``MOEYARD_EXPERTS_BACKEND`` replaces ``"auto"`` process-wide. A backend named
            explicitly that cannot serve the inputs (e.g. ``"grouped_mm"`` where torch's kernel
            would synchronize with the host) raises an error that says why.

    Rows are read from x through the plan (no permuted copy of x). Products accumulate in fp32;
    the activation's output is kept in x's dtype; the combine sums in fp32 in slot order (a
    gather: deterministic). Differentiable w.r.t. x, weights and all expert parameters. For the
    backward it saves the first product's pre-activation ``[R, N1]`` (and references its inputs);
    the activation is recomputed from it.
    """
    if layout == "linear":
        w1, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
    elif layout == "matmul":
        w1, w2 = gate_up, down
    else:
        raise ValueError(f"layout must be 'linear' or 'matmul', got {layout!r}")
    return _ops.expert_ffn.default(x, plan.row_source, plan.token_row, plan.offsets, plan.capacity,
                                   weights, w1, w2, gate_up_bias, down_bias, activation, backend)


@torch.library.register_fake("moeyard::expert_ffn")
def _expert_ffn_fake(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1=None,
                     b2=None, activation="swiglu", backend="auto"):
    _check_same_device(locals())
    _check_backend(backend)
    torch._check(x.dim() == 2 and w1.dim() == 3 and w2.dim() == 3,
                 lambda: "x must be 2-D, w1 and w2 3-D")
    torch._check(activation in ACTIVATIONS, lambda: unknown_activation(activation))
    return x.new_empty(x.shape)


@torch.library.register_fake("moeyard::_expert_ffn_forward")
def _expert_ffn_forward_fake(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1,
                             b2, activation, backend="auto"):
    _check_same_device(locals())
    out = _expert_ffn_fake(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1, b2,
                           activation, backend)
    return out, x.new_empty((row_source.shape[0], w1.shape[2]))


@torch.library.register_fake("moeyard::_expert_ffn_backward")
def _expert_ffn_backward_fake(grad, x, row_source, token_row, offsets, capacity, weights, w1, w2,
                              b1, b2, activation, h, output_mask, backend="auto",
                              consume_h=False):
    _check_same_device(locals())
    _check_backend(backend)
    def like(t, need):
        return torch.empty_like(t) if need and t is not None else x.new_empty((0,))
    return (like(x, output_mask[0]), like(weights, output_mask[1]), like(w1, output_mask[2]),
            like(w2, output_mask[3]), like(b1, output_mask[4]), like(b2, output_mask[5]))


# ------------------------------------------------------------------------- SMEAR merged experts


def merged_linear(x: Tensor, probs: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """SMEAR's merged expert as one linear layer (ALGORITHMS.md 3.3): per example b,
    ``y[b] = x[b] @ (sum_e probs[b,e] W_e)^T + sum_e probs[b,e] bias_e``; ``[B, S, N]``.

    Args:
        x: ``[B, S, K]`` (fp32, fp16 or bf16; fp64 on CPU): B examples of S tokens.
        probs: ``[B, E]`` routing probabilities, fp32 (fp64 with fp64 x).
        weight: ``[E, N, K]`` expert weights in x's dtype, nn.Linear order (Hugging Face v5's
            ``gate_up_proj`` / ``down_proj``). Either memory order works without a copy:
            contiguous, or ``w.transpose(1, 2)`` of an ``[E, K, N]``-contiguous tensor.
        bias: optional ``[E, N]`` in x's dtype.

    The merged weights are formed chunk by chunk (never all B at once when that is large: at most
    256 MiB of merged weights per chunk, at least one example; the chunk size depends only on the
    shapes) by one GEMM ``probs @ W[E, N*K]`` with fp32 accumulation, rounded to x's dtype, then
    one batched product per chunk. Differentiable w.r.t. all four inputs; the backward recomputes
    the merged weights instead of saving them. Gradients of ``weight`` and ``bias`` have their
    memory order. Details and costs: csrc/merge/merge_ops.cpp.
    """
    return _ops.merged_linear.default(x, probs, weight, bias)


@torch.library.register_fake("moeyard::merged_linear")
def _merged_linear_fake(x, probs, weight, bias=None):
    _check_same_device(locals())
    torch._check(x.dim() == 3 and probs.dim() == 2 and weight.dim() == 3,
                 lambda: "x must be 3-D, probs 2-D and weight 3-D")
    torch._check(weight.shape[2] == x.shape[2],
                 lambda: f"x has K={x.shape[2]}, weight [E, N, K] has K={weight.shape[2]}")
    torch._check(probs.shape[0] == x.shape[0] and probs.shape[1] == weight.shape[0],
                 lambda: f"probs must be [B, E] = [{x.shape[0]}, {weight.shape[0]}]")
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))


@torch.library.register_fake("moeyard::_merged_linear_backward")
def _merged_linear_backward_fake(grad, x, probs, weight, bias, output_mask):
    _check_same_device(locals())
    def like(t, need, keep_strides):
        if not need or t is None:
            return x.new_empty((0,))
        return torch.empty_like(t) if keep_strides else t.new_empty(t.shape)
    return (like(x, output_mask[0], False), like(probs, output_mask[1], False),
            like(weight, output_mask[2], True), like(bias, output_mask[3], True))


def _set_merge_budget(nbytes: int) -> int:
    """Sets the bytes of merged weights :func:`merged_linear` forms per chunk (process-wide; the
    default is 256 MiB, one example per chunk at least); returns the previous value. A tuning and
    testing knob: a smaller budget means more, smaller chunks (the experts' weights are read once
    per chunk), never a different result beyond rounding."""
    return _ops._set_merge_budget(nbytes)
