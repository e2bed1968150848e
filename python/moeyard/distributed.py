"""Expert parallelism (EP) on torch.distributed: ``import moeyard.distributed``.

The E experts of a layer are split over the P ranks of an EP process group in contiguous blocks:
expert e lives on rank ``e // E_l`` (``E_l = E / P`` local experts, global ids
``rank * E_l + i``). The router (and any shared expert) stays replicated; only the experts
are sharded (:class:`ShardedExperts`, or a transformers experts module, see the end). A layer's
forward is unchanged: its router and :func:`moeyard.plan` run on the rank's own tokens, then the
exchange (:class:`ExpertParallel`) does

  sender     rows = permute(x, plan)        the plan's rows are expert-major, so destination-major
  exchange   counts kept per expert          one equal-split all-to-all of [E] int32 (no sync)
             rows                            all-to-all (:func:`all_to_all`)
  receiver   a k = 1 plan over the received rows (local expert id, -1 for padding) and
             :func:`moeyard.expert_ffn` with unit weights on the local experts
  exchange   outputs back                    the same all-to-all with the splits swapped
  sender     unpermute(outputs, plan, weights): routing weights never leave the rank, so the
             router's gradient stays local

Two modes, chosen by the plan the layer builds (its capacity setting, as on one device):

- **capacity** (``plan.capacity = C``, the layer has a capacity factor; always for expert choice
  and BASE training): every rank sends its ``E * C`` rows in equal splits. Static shapes and **no
  host synchronization**, forward and backward: ``torch.compile(fullgraph=True)`` traces it
  (tested on CPU), and with NCCL it can be captured in a CUDA graph. C comes from the rank's
  local token count, so drops are decided per (source rank, expert) and each rank's output equals
  the single-device layer's on its tokens. Every rank must have the same local token count.
- **dropless** (``plan.capacity = None``): after the count exchange, **one device-to-host copy of
  the split sizes per layer forward** (``all_to_all_single`` takes Python split sizes), then the
  variable exchange of exactly the routed rows. The backward reuses the sizes: no sync. Ranks may
  have different token counts, zero included. Each rank's output equals the single-device
  dropless layer's.

Agreement across ranks: constructing a :class:`ShardedExperts` checks that every rank has the
same experts' shapes (E, d, I, activation, biases); the first forward with a new (mode, k, dtype,
capacity, local token count in capacity mode) checks it too (one all-gather of a few integers and
a host read), so a mismatch raises the same clear error on every rank instead of hanging or
corrupting the exchange. Later forwards with the same key do not check; the check is skipped
while ``torch.compile`` traces or a CUDA graph captures (run one eager forward first).

Training: the experts' gradients are already summed over every rank whose tokens they computed,
while replicated parameters get per-rank gradients; :func:`sync_gradients` averages the
replicated ones over the data-parallel group and divides the experts' by its size, which makes EP
training equal to single-device training on the concatenated batch with a mean loss.
:func:`expert_parameters` lists the sharded parameters (keep them out of DDP).

Sharded parameters, the one protocol :func:`full_state_dict`, :func:`load_full_state_dict`,
:func:`expert_parameters` and :func:`sync_gradients` read: a module whose attribute ``ep`` is an
:class:`ExpertParallel` holds as its own parameters only this rank's ``E_l`` rows (dim 0) of the
E stacked experts. :class:`ShardedExperts` is one; :func:`shard_parameters` makes one of any
module of stacked expert parameters (``moeyard.hf.replace_moe(model, ep_group=...)`` does it to
transformers' experts modules).

``import moeyard`` does not import this module; the layers import it when given an ``ep_group``.
"""
from __future__ import annotations

import copy
import zlib
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as _fc
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import Experts, MergedExperts
from .ops import RoutingPlan, permute, plan, unpermute
from .reference import ACTIVATIONS

__all__ = ["all_to_all", "ExpertParallel", "ShardedExperts", "shard_experts", "shard_parameters",
           "full_state_dict", "load_full_state_dict", "global_batch_counts", "expert_parameters",
           "sync_gradients", "clip_grad_norm_"]


def _group_size(group) -> int:
    return dist.get_world_size(group)


# ------------------------------------------------------------------------------- all-to-all


def all_to_all(x: Tensor, output_split_sizes: Optional[list[int]] = None,
               input_split_sizes: Optional[list[int]] = None, group=None) -> Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: ``x``'s rows are cut into
    ``input_split_sizes`` (None: P equal parts), part r goes to rank r; the result stacks the parts
    received from ranks 0..P-1 (``output_split_sizes`` rows each; None: equal, as many rows as x).
    The backward is the same exchange with the splits swapped. Identity for a group of one rank.
    Any dtype the backend supports (gloo: fp32, bf16, fp16, int32, int64, on CPU and CUDA).

    It is torch's functional collective (``all_to_all_single_autograd``), waited on at once, so
    ``torch.compile`` traces it as one op, forward and backward. (An ``autograd.Function`` around
    the in-place ``dist.all_to_all_single`` compiles too, but its compiled backward returns zero
    gradients in torch 2.11: measured, see tests/test_distributed.py ``check_compile``.)"""
    group = dist.group.WORLD if group is None else group
    if _group_size(group) == 1:
        return x
    out = _fc.all_to_all_single_autograd(x.contiguous(), output_split_sizes, input_split_sizes,
                                         group)
    return _fc.wait_tensor(out)


# -------------------------------------------------------------------------- agreement checks


def _skip_checks() -> bool:
    """True while torch.compile traces or a CUDA graph captures (a check would sync)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_agree(group, device, what: str, **values: int) -> None:
    """All ranks of ``group`` have the same ``values`` (name -> int), else a ValueError naming them
    on every rank (one all-gather of a few integers and a host read)."""
    mine = torch.tensor(list(values.values()), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(_group_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).cpu().tolist()
    if any(r != rows[0] for r in rows):
        per_rank = "; ".join(f"rank {i}: " + ", ".join(f"{n}={v}" for n, v in zip(values, r))
                             for i, r in enumerate(rows))
        raise ValueError(f"moeyard.distributed: the ranks of the expert-parallel group disagree "
                         f"on {what} ({per_rank})")


_DTYPES = {dt: i for i, dt in enumerate((torch.float32, torch.float16, torch.bfloat16,
                                         torch.float64))}
_ACTIVATION_CODES = {name: i for i, name in enumerate(sorted(ACTIVATIONS))}


# ------------------------------------------------------------------------------ the exchange


class ExpertParallel:
    """The exchange of one expert-parallel layer over ``group`` (see the module docstring): E
    global experts in contiguous blocks of ``E_l = E / P`` per rank, and the agreement checks'
    memory (a ``ShardedExperts`` holds one; so does a Hugging Face block sharded by
    ``moeyard.hf.replace_moe(ep_group=...)``).

    ``ep(x [T, d], plan, weights [T, k], local) -> [T, d]`` sends the plan's rows to the ranks
    owning their experts, runs ``local(rows [R, d], local_plan, unit_weights [R, 1]) -> [R, d]``
    there (``local_plan`` a k = 1 plan over the ``E_l`` local experts, e.g.
    :func:`moeyard.expert_ffn` on the local weights), brings the rows home and combines them with
    ``weights``. Collective: every rank of the group calls it for the same layer.
    """

    def __init__(self, num_experts: int, ep_group=None):
        self.group = _process_group(ep_group)
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if num_experts < 1 or num_experts % self.size:
            raise ValueError(f"num_experts={num_experts} must be a positive multiple of the "
                             f"expert-parallel group size {self.size}")
        self.num_experts, self.num_local_experts = num_experts, num_experts // self.size
        self.first_expert = self.rank * self.num_local_experts
        self._agreed: set = set()

    def __deepcopy__(self, memo):  # a copied layer shares the process group
        other = copy.copy(self)
        other._agreed = set(self._agreed)
        return other

    @property
    def local_experts(self) -> slice:
        """The global ids this rank holds."""
        return slice(self.first_expert, self.first_expert + self.num_local_experts)

    @property
    def placement(self) -> str:
        """``"experts 2..3 of 8 (rank 1 of 4)"``, for the layers' reprs."""
        mine = self.local_experts
        return (f"experts {mine.start}..{mine.stop - 1} of {self.num_experts} "
                f"(rank {self.rank} of {self.size})")

    def check_device(self, like: Tensor) -> torch.device:
        """Where the group's collectives take their tensors: CUDA for NCCL, else ``like``'s."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu") if like.device.type == "meta" else like.device

    def check_agree(self, like: Tensor, what: str, **values: int) -> None:
        """Every rank of the group has the same ``values``, else ValueError on every rank."""
        if self.size > 1:
            _check_agree(self.group, self.check_device(like), what, **values)

    def __call__(self, x: Tensor, plan: RoutingPlan, weights: Tensor, local) -> Tensor:
        if plan.num_experts != self.num_experts:
            raise ValueError(f"the plan routes to {plan.num_experts} experts, the layer has "
                             f"{self.num_experts}")
        if self.size == 1:
            return local(x, plan, weights)
        self._check_forward(x, plan)
        if plan.capacity is None:
            return self._dropless(x, plan, weights, local)
        return self._capacity(x, plan, weights, local)

    def _check_forward(self, x: Tensor, p: RoutingPlan) -> None:
        capacity = -1 if p.capacity is None else p.capacity
        key = (capacity, p.token_row.shape[1], x.dtype, x.shape[1],
               x.shape[0] if p.capacity is not None else -1)
        if key in self._agreed or _skip_checks():
            return
        self.check_agree(x, "the exchange (capacity -1 = dropless; tokens are compared in "
                         "capacity mode, where every rank needs the same local token count)",
                         capacity=capacity, k=key[1], dtype=_DTYPES.get(x.dtype, -1),
                         hidden_size=key[3], tokens=key[4])
        self._agreed.add(key)

    def _local(self, recv: Tensor, recv_experts: Tensor, local) -> Tensor:
        """``local`` on the received rows (``recv_experts``: local expert id per row, -1 for
        padding): ``[R, d]``, 0 on padding rows."""
        p = plan(recv_experts.reshape(-1, 1), self.num_local_experts)
        ones = torch.ones((recv.shape[0], 1), dtype=torch.float32, device=recv.device)
        return local(recv, p, ones)

    def _capacity(self, x: Tensor, p: RoutingPlan, weights: Tensor, local) -> Tensor:
        P, El, C, g = self.size, self.num_local_experts, p.capacity, self.group
        kept = p.offsets[1:] - p.offsets[:-1]                      # [E], expert e's kept rows
        recv_kept = all_to_all(kept, group=g).view(P, El, 1)       # [source, local expert]
        recv = all_to_all(permute(x, p), group=g)                  # [P * El * C, d]
        slot = torch.arange(C, device=x.device, dtype=recv_kept.dtype)
        ids = torch.arange(El, device=x.device, dtype=recv_kept.dtype).view(1, El, 1)
        recv_experts = torch.where(slot < recv_kept, ids, -1)      # [P, El, C]
        y = all_to_all(self._local(recv, recv_experts, local), group=g)  # [E * C, d]
        return unpermute(y, p, weights)

    def _dropless(self, x: Tensor, p: RoutingPlan, weights: Tensor, local) -> Tensor:
        P, El, g = self.size, self.num_local_experts, self.group
        kept = p.offsets[1:] - p.offsets[:-1]
        recv_kept = all_to_all(kept, group=g)                      # [P * El]
        sizes = torch.stack([kept.view(P, El).sum(1), recv_kept.view(P, El).sum(1)])
        send_sizes, recv_sizes = sizes.tolist()                    # the one host sync
        sent = sum(send_sizes)
        recv = all_to_all(permute(x, p)[:sent], recv_sizes, send_sizes, g)
        ids = torch.arange(El, device=x.device, dtype=torch.int32).repeat(P)
        recv_experts = torch.repeat_interleave(ids, recv_kept, output_size=recv.shape[0])
        y = all_to_all(self._local(recv, recv_experts, local), send_sizes, recv_sizes, g)
        y = F.pad(y, (0, 0, 0, p.num_rows - sent))                 # the plan's unused rows
        return unpermute(y, p, weights)


# ---------------------------------------------------------------------------- sharded experts


class ShardedExperts(Experts):
    """The local block of E experts on one rank of an expert-parallel group, and the exchange that
    runs them for every rank's tokens (:class:`ExpertParallel`, attribute ``ep``).

    Parameters as :class:`moeyard.Experts` with ``E_l = E / P`` rows: ``gate_up_proj
    [E_l, N1, d]``, ``down_proj [E_l, d, I]``, optional biases; they hold global experts
    ``ep.local_experts``. ``forward(x [T, d], plan, weights [T, k]) -> [T, d]`` takes the rank's
    own tokens and a plan over the E global experts, exactly as :class:`moeyard.Experts` does, and
    is collective: every rank of the group must call it.

    Built directly (``TopKMoE(..., ep_group=g)`` and the other layers do this) every rank draws
    all E experts' initial weights, one expert at a time, and keeps its own: with the same seed on
    every rank the experts are distinct and the replicated parameters identical.
    :meth:`from_experts` (and :func:`shard_experts`) keep the local slice of a full
    :class:`moeyard.Experts` instead (a loaded checkpoint).

    Args:
        num_experts: E, the global number of experts; P must divide it.
        ep_group: the expert-parallel process group (a ``ProcessGroup``, a 1-D ``DeviceMesh`` or
            None for the default group).
        the rest: as :class:`moeyard.Experts`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str = "swiglu", bias: bool = False, initializer_range: float = 0.02,
                 device=None, dtype=None, *, backend: str = "auto", ep_group=None):
        self.ep = ExpertParallel(num_experts, ep_group)  # before reset_parameters needs it
        super().__init__(self.ep.num_local_experts, hidden_size, intermediate_size, activation,
                         bias, initializer_range, device, dtype, backend=backend)
        self._check_shapes()

    def _check_shapes(self) -> None:
        self.ep.check_agree(self.gate_up_proj, "the experts' shapes",
                            num_experts=self.ep.num_experts, hidden_size=self.hidden_size,
                            intermediate_size=self.intermediate_size,
                            activation=_ACTIVATION_CODES[self.activation],
                            bias=int(self.gate_up_proj_bias is not None))

    def reset_parameters(self) -> None:
        """As :meth:`moeyard.Experts.reset_parameters` for all E experts, drawn expert by expert
        in global order (one expert's scratch at a time), keeping this rank's: every rank consumes
        the same random numbers."""
        mine = self.ep.local_experts
        with torch.no_grad():
            for p in (self.gate_up_proj, self.down_proj):
                for e in range(self.ep.num_experts):
                    draw = torch.empty_like(p[0]).normal_(std=self.initializer_range)
                    if mine.start <= e < mine.stop:
                        p[e - mine.start].copy_(draw)
        if self.gate_up_proj_bias is not None:
            nn.init.zeros_(self.gate_up_proj_bias)
            nn.init.zeros_(self.down_proj_bias)

    @classmethod
    def from_experts(cls, experts: Experts, ep_group=None) -> "ShardedExperts":
        """A :class:`ShardedExperts` holding this rank's slice of the full ``experts`` (copies of
        its rows, same dtype, device and backend)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.ep = ExpertParallel(experts.num_experts, ep_group)
        self.num_experts, self.hidden_size = self.ep.num_local_experts, experts.hidden_size
        self.intermediate_size, self.activation = experts.intermediate_size, experts.activation
        self.initializer_range, self.backend = experts.initializer_range, experts.backend
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            p = getattr(experts, name)
            self.register_parameter(name, None if p is None else _local_rows(p, self.ep))
        self._check_shapes()
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.ep.placement

    def forward(self, x: Tensor, plan: RoutingPlan, weights: Tensor) -> Tensor:
        return self.ep(x, plan, weights, super().forward)


def _local_rows(p: Tensor, ep: ExpertParallel) -> nn.Parameter:
    """A new parameter holding a copy of this rank's experts (rows ``ep.local_experts``) of the
    stacked ``p`` (same dtype, device and requires_grad)."""
    return nn.Parameter(p.detach()[ep.local_experts].clone(), p.requires_grad)


def shard_parameters(module: nn.Module, ep: ExpertParallel) -> nn.Module:
    """Keep only this rank's experts of ``module``, in place: each of its own parameters, all of
    which stack the ``ep.num_experts`` experts along dim 0, becomes a new parameter holding a copy
    of the rows ``ep.local_experts`` (same name, dtype, device and requires_grad; the full tensor
    is freed once nothing else holds it), and ``module.ep = ep`` marks it sharded (the protocol of
    the module docstring). For modules whose forward runs ``ep`` (``moeyard.hf.replace_moe`` with
    ``ep_group`` shards transformers' experts modules with it). Collective: checks that every rank
    shards the same parameters. ValueError, before anything changes, if a parameter is not
    stacked by expert. Returns ``module``."""
    params = dict(module.named_parameters(recurse=False))
    stacked = {n: p for n, p in params.items() if p.dim() and p.shape[0] == ep.num_experts}
    if not params or stacked.keys() != params.keys():
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        raise ValueError(f"shard_parameters: {type(module).__name__}'s parameters must all stack "
                         f"its {ep.num_experts} experts along dim 0, got {shapes}")
    layout = repr([(n, tuple(p.shape), str(p.dtype)) for n, p in params.items()])
    ep.check_agree(next(iter(params.values())), "the sharded experts' parameters (a checksum of "
                   "their names, shapes and dtypes)", signature=zlib.crc32(layout.encode()))
    for name, p in params.items():
        setattr(module, name, _local_rows(p, ep))
    module.ep = ep
    return module


def _process_group(ep_group):
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh or None (the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs torch.distributed: call "
                           "torch.distributed.init_process_group first")
    if ep_group is None:
        return dist.group.WORLD
    if hasattr(ep_group, "get_group"):  # DeviceMesh
        if ep_group.ndim != 1:
            raise ValueError(f"ep_group: a DeviceMesh must be 1-D, got {ep_group.ndim}-D")
        return ep_group.get_group()
    return ep_group


# --------------------------------------------------------------------- models and checkpoints


def _expert_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(qualified name, layer) of every module whose ``experts`` child is a moeyard
    :class:`moeyard.Experts` (the token-routed layers)."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, "experts", None), Experts):
            yield name, m


def shard_experts(model: nn.Module, ep_group=None) -> nn.Module:
    """Shard every moeyard MoE layer of ``model`` in place: each layer's :class:`moeyard.Experts`
    becomes the :class:`ShardedExperts` holding this rank's slice (build or load the full model
    the same way on every rank first). SMEAR layers are refused (they merge the experts' weights
    per example; shard them with FSDP instead). Returns ``model``."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, "experts", None), MergedExperts):
            raise ValueError(f"shard_experts: {name or type(m).__name__} is a SMEAR layer, which "
                             "merges the experts' weights instead of routing tokens: it cannot "
                             "be expert-parallel (use FSDP to shard it)")
    for _, layer in list(_expert_layers(model)):
        if not isinstance(layer.experts, ShardedExperts):
            layer.experts = ShardedExperts.from_experts(layer.experts, ep_group)
    return model


def _sharded_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ExpertParallel]]:
    """(qualified name, parameter, its exchange) of every sharded expert parameter of ``model``:
    the own parameters of each module whose ``ep`` is an :class:`ExpertParallel` (the protocol of
    the module docstring: :class:`ShardedExperts`, modules :func:`shard_parameters` sharded)."""
    for prefix, m in model.named_modules():
        ep = getattr(m, "ep", None)
        if isinstance(ep, ExpertParallel):
            for name, p in m.named_parameters(recurse=False):
                yield (f"{prefix}.{name}" if prefix else name), p, ep


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded expert parameter (:class:`ShardedExperts`, or a
    transformers experts module sharded by ``moeyard.hf.replace_moe(ep_group=...)``) gathered to
    all E experts (collective over each layer's EP group: call it on every rank). It loads into
    the unsharded model."""
    sd = model.state_dict()
    for key, p, ep in _sharded_parameters(model):
        parts = [torch.empty_like(p) for _ in range(ep.size)]
        dist.all_gather(parts, p.detach().contiguous(), group=ep.group)
        sd[key] = torch.cat(parts)
    return sd


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Load an unsharded state dict (all E experts per layer) into a model with sharded experts
    (:class:`ShardedExperts`, or transformers experts modules sharded by
    ``moeyard.hf.replace_moe(ep_group=...)``): each rank keeps its slice. Returns
    ``model.load_state_dict``'s result."""
    sd = dict(state_dict)
    for key, _, ep in _sharded_parameters(model):
        if key in sd:
            full = sd[key]
            if full.shape[0] != ep.num_experts:
                raise ValueError(f"{key}: expected {ep.num_experts} experts in the full state "
                                 f"dict, got shape {tuple(full.shape)}")
            sd[key] = full[ep.local_experts]
    return model.load_state_dict(sd, strict=strict)


# ------------------------------------------------------------------------------- aux losses


def global_batch_counts(counts: Tensor, num_tokens: int, group=None) -> tuple[Tensor, Tensor]:
    """Global-batch load balancing (Qiu et al. 2025, arXiv 2501.11873): ``(counts summed over
    group [E] int32, num_tokens / total tokens of the group)`` by one all-reduce with no gradient
    and no host sync. ``router_losses(logits, summed, k)[0] * share`` is the balance loss with
    ``f_e`` from the global batch and ``P_e`` from the local tokens."""
    both = torch.cat([counts.detach().to(torch.int64),
                      torch.full((1,), num_tokens, dtype=torch.int64, device=counts.device)])
    if _group_size(group) > 1:
        dist.all_reduce(both, group=group)
    return both[:-1].to(counts.dtype), num_tokens / both[-1].clamp(min=1).float()


# -------------------------------------------------------------------------------- gradients


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every sharded expert parameter of ``model`` (the parameters that
    differ per rank): leave them out of DDP (``DistributedDataParallel``'s
    ``_set_params_and_buffers_to_ignore_for_model``) and of any data-parallel all-reduce over the
    EP group; :func:`sync_gradients` treats them."""
    return [(name, p) for name, p, ep in _sharded_parameters(model) if ep.size > 1]


def _sum_and_divide(grads: list[Tensor], group, divide: int, reduce: bool = True) -> None:
    """Sum ``grads`` over ``group`` (one flat fp32 all-reduce; none if ``reduce`` is False) and
    divide them by ``divide``."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    if reduce and _group_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.div_(divide)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


@torch.no_grad()
def sync_gradients(model: nn.Module, group=None, *, expert_data_group=None,
                   replicated: bool = True) -> None:
    """Make expert-parallel gradients those of single-device training on the concatenated batch.

    Call after ``backward`` and before the optimizer step, with each rank's loss a mean over its
    own tokens (as with DDP). ``group`` is the data-parallel group: every rank that sees distinct
    tokens (default: the world). Its size W divides everything:

    - replicated parameters (router, shared experts, the rest of the model): averaged over
      ``group`` (one all-reduce; ``replicated=False`` skips it when DDP or FSDP does it already);
    - sharded experts: the exchange's backward has already summed the contributions of every rank
      of the EP group into them. With pure expert parallelism (the EP group is ``group``) they are
      only divided by W. When the experts are replicated over several EP groups (e.g. EP 2 within
      a world of 4), pass ``expert_data_group``: the ranks holding the same experts (one from
      each EP group); their gradients are summed over it first.

    Tested equal to single-device gradients for pure EP (2 and 4 ranks) and for EP 2 in a world
    of 4 (tests/test_distributed.py)."""
    size = dist.get_world_size(group)
    sharded = expert_parameters(model)
    _sum_and_divide([p.grad for _, p in sharded if p.grad is not None], expert_data_group, size,
                    reduce=expert_data_group is not None)
    if replicated:
        ids = {id(p) for _, p in sharded}
        _sum_and_divide([p.grad for p in model.parameters()
                         if id(p) not in ids and p.grad is not None], group, size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for an expert-parallel model: the total norm counts the
    sharded experts' gradients of every rank (their squared norms are summed over each EP group:
    one all-reduce of a scalar per group), so every rank scales by the same factor and the
    replicated parameters stay identical. (A rank's own ``clip_grad_norm_`` sees only its
    experts.) Call it after :func:`sync_gradients`. Returns the total norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    squares: dict[int, list] = {}  # id(EP group) -> [group, squared norm of its experts' grads]
    sharded = set()
    for _, p, ep in _sharded_parameters(model):
        if ep.size > 1 and p.grad is not None:
            sharded.add(id(p))
            entry = squares.setdefault(id(ep.group), [ep.group, torch.zeros((), device=device)])
            entry[1] = entry[1] + p.grad.float().pow(2).sum()
    total = sum((p.grad.float().pow(2).sum() for p in params if id(p) not in sharded),
                torch.zeros((), device=device))
    for group, sq in squares.values():
        dist.all_reduce(sq, group=group)
        total = total + sq
    norm = total.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
