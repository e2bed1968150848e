"""Routing telemetry: an opt-in recorder of what every MoE layer of a model routed, per forward.

::

    with moeyard.record_routing(model) as rec:
        model(x)
    rec.layers                        # qualified names of the layers that reported, in order
    rec["blocks.0.mlp"]               # [RoutingRecord], one per forward of that layer
    rec.load("blocks.0.mlp")          # [N, E] tokens per expert of each forward (pre-drop)
    rec.max_violation("blocks.0.mlp") # [N] MaxVio of each forward

A :class:`RoutingRecord` holds device tensors, detached and not copied (the layer's own
tensors): router ``logits``, ``experts`` (-1 = none), ``weights``, the plan's ``counts`` and the
``dropped`` mask, plus layer-specific ``extra`` tensors (BASE's ``assignment``, SMEAR's
``probs``). Recording never reads a device value on the host, so it never stalls the GPU: read
the reductions when you need the numbers. ``fields=`` keeps only some of them (a long run that
only needs loads keeps ``("counts",)``: one ``[E]`` tensor per layer and forward).

The reductions papers report: :func:`expert_load` (load over steps), :func:`moeyard.max_violation`
(MaxVio), :func:`routing_entropy`, :func:`routing_fluctuation` (StableMoE's routing fluctuation)
and :func:`domain_distribution` (expert distribution per domain). All return device tensors.

**How a layer reports.** Its forward calls :func:`report_routing` once, after routing::

    report_routing(self, logits=logits, experts=experts, weights=weights, plan=plan)

With no recorder active that call returns at its first line (one truthiness test of a module
list): no tensor op, no hook (nothing is ever registered on modules), and under
``torch.compile(fullgraph=True)`` it traces to nothing. With a recorder active it appends a
record (outside any compiled graph: the recording path is ``torch.compiler.disable``-d, so a
compiled model graph-breaks there, and ``fullgraph=True`` refuses to record). Any module can
report, a new layer type included; it is recorded under its qualified name in the model the
recorder watches (modules outside that model are ignored).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .ops import RoutingPlan, max_violation

__all__ = ["RoutingRecord", "RoutingRecorder", "record_routing", "report_routing",
           "expert_load", "routing_entropy", "routing_fluctuation", "domain_distribution"]

#: The recorders now recording (a list so that two can watch one model, e.g. a training-loop
#: recorder and a probe's). Only :meth:`RoutingRecorder.start` / ``stop`` change it.
_ACTIVE: list["RoutingRecorder"] = []

#: The fields every record has (``extra`` holds the rest, by the names the layer reported).
FIELDS = ("logits", "experts", "weights", "counts", "dropped")


@dataclasses.dataclass(frozen=True)
class RoutingRecord:
    """What one layer routed in one forward: device tensors, detached (not copied), or None when
    the layer did not report the field or the recorder was told not to keep it.

    ``T`` is the layer's token count (its input flattened to ``[T, d]``, batch-major: token
    ``b * S + s``), ``k`` its slots per token, ``E`` its experts.

    training     the layer's ``training`` flag in that forward (a Python bool).
    num_experts  E.
    logits       ``[T, E]`` the router's logits (fp32; BASE: the token-centroid affinities).
    experts      ``[T, k]`` int: each token's experts, -1 = none (ReMoE's inactive slots, a token
                 that expert choice left out). Top-k routers: best first; expert choice: by id.
    weights      ``[T, k]`` the combine weights of those experts.
    counts       ``[E]`` int32 the plan's assignments per expert, before capacity drops.
    dropped      ``[T, k]`` bool: the router chose an expert but the capacity dropped the
                 assignment (``token_row < 0`` where ``experts >= 0``).
    extra        other tensors, by name: :class:`moeyard.BaseMoE` ``"assignment"`` ``[T, 1]``
                 (each token's expert: the balanced auction's in training, argmax in eval;
                 ``logits.argmax(-1)`` is what greedy routing would have picked);
                 :class:`moeyard.SmearMoE` ``"probs"`` ``[B, E]`` (per-example routing
                 probabilities after expert dropout; SMEAR reports nothing else).
    """

    training: bool
    num_experts: int
    logits: Optional[Tensor] = None
    experts: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    counts: Optional[Tensor] = None
    dropped: Optional[Tensor] = None
    extra: dict = dataclasses.field(default_factory=dict)

    def top1(self) -> Tensor:
        """Each token's target expert ``[T]`` (int64): among the experts the router chose for it
        (capacity drops included), the one with the largest combine weight, ties to the earlier
        slot; -1 for a token with none. Top-k routers: their first choice (with bias balancing,
        the chosen expert of highest score). SMEAR (``probs`` only): each example's most probable
        expert ``[B]``."""
        if self.experts is None:
            probs = self.extra.get("probs")
            if probs is None:
                raise ValueError("top1 needs a record with experts (and weights when k > 1) or "
                                 "probs; record them (fields=...)")
            return probs.argmax(-1)
        experts = self.experts.long()
        if experts.shape[1] == 1:
            return experts[:, 0]
        if self.weights is None:
            raise ValueError("top1 of a k > 1 routing needs its weights; record them (fields=...)")
        w = self.weights.float().masked_fill(experts < 0, float("-inf"))
        return experts.gather(1, w.argmax(-1, keepdim=True))[:, 0]

    def distribution(self) -> Tensor:
        """The routing distribution ``[rows, E]`` (fp32 or fp64): SMEAR's ``probs`` per example,
        else the softmax of the router logits per token (the router's probabilities for softmax
        routers; for sigmoid, ReLU or BASE routers a normalization of their logits)."""
        probs = self.extra.get("probs")
        if probs is not None:
            return probs
        if self.logits is None:
            raise ValueError("this record has neither logits nor probs; record them (fields=...)")
        return torch.softmax(self.logits.float(), dim=-1)


def report_routing(layer: nn.Module, *, logits: Optional[Tensor] = None,
                   experts: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                   plan: Optional[RoutingPlan] = None, **extra: Tensor) -> None:
    """Hand one forward's routing of ``layer`` to the active recorders; a no-op when none is.

    Every MoE layer calls it once per forward, after its plan, with what it has: ``logits [T, E]``
    (its router's), ``experts [T, k]`` (-1 = none), ``weights [T, k]``, ``plan`` (its
    :class:`moeyard.RoutingPlan`: the record keeps its ``counts`` and derives the ``dropped``
    mask), and any other tensors by keyword (kept in :attr:`RoutingRecord.extra` under that
    name). Pass the tensors as they are: the recorder detaches them, and computes nothing from
    them unless it is recording. Never reads a device value on the host."""
    if not _ACTIVE:
        return
    _record(layer, logits, experts, weights, plan, extra)


@torch.compiler.disable(reason="moeyard.record_routing records outside compiled graphs: stop "
                                "the recorder, or compile without fullgraph=True to record")
def _record(layer, logits, experts, weights, plan, extra) -> None:
    for recorder in _ACTIVE:
        recorder._add(layer, logits, experts, weights, plan, extra)


def _detach(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


class RoutingRecorder:
    """Records the routing of every layer of ``model`` that reports (:func:`report_routing`),
    one :class:`RoutingRecord` per forward, in :attr:`records` (qualified module name -> list).
    ``model`` itself is recorded under ``""`` if it reports (a single layer).

    Use it as a context manager (``with recorder:``, re-enterable: records accumulate) or call
    :meth:`start` / :meth:`stop`. Every forward while it is active is recorded: training,
    eval, and activation-recompute passes alike (:attr:`RoutingRecord.training` tells training
    from eval). Holding a record keeps its tensors alive: keep only the ``fields`` you need.

    Args:
        model: the module whose layers are recorded (their names are its ``named_modules``).
        fields: names of the fields to keep: any of :data:`FIELDS` and of the layers' extra
            tensors (``"assignment"``, ``"probs"``, ...). Default None: all of them.
    """

    def __init__(self, model: nn.Module, fields: Optional[Iterable[str]] = None):
        self.model = model
        self.fields = None if fields is None else frozenset(fields)
        self.records: dict[str, list[RoutingRecord]] = {}
        self._names: dict[nn.Module, str] = {}

    # ------------------------------------------------------------------------- on and off

    @property
    def active(self) -> bool:
        return any(r is self for r in _ACTIVE)

    def start(self) -> "RoutingRecorder":
        """Start recording (the model's module names are read now). Returns self."""
        if not self.active:
            self._names = {m: name for name, m in self.model.named_modules()}
            _ACTIVE.append(self)
        return self

    def stop(self) -> None:
        """Stop recording; the records stay."""
        for i, r in enumerate(_ACTIVE):
            if r is self:
                del _ACTIVE[i]
                return

    def __enter__(self) -> "RoutingRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget every record."""
        self.records = {}

    # ---------------------------------------------------------------------------- records

    def _keep(self, field: str) -> bool:
        return self.fields is None or field in self.fields

    def _add(self, layer, logits, experts, weights, plan, extra) -> None:
        name = self._names.get(layer)
        if name is None:
            return
        keep = self._keep
        num_experts = getattr(layer, "num_experts", None)
        if num_experts is None:
            source = logits if logits is not None else extra.get("probs")
            num_experts = source.shape[-1] if source is not None else plan.num_experts
        dropped = None
        if keep("dropped") and plan is not None and experts is not None:
            dropped = (plan.token_row < 0) & (experts >= 0)
        record = RoutingRecord(
            training=layer.training, num_experts=num_experts,
            logits=_detach(logits) if keep("logits") else None,
            experts=_detach(experts) if keep("experts") else None,
            weights=_detach(weights) if keep("weights") else None,
            counts=plan.counts if keep("counts") and plan is not None else None,
            dropped=dropped,
            extra={k: v.detach() for k, v in extra.items() if keep(k)})
        self.records.setdefault(name, []).append(record)

    @property
    def layers(self) -> list[str]:
        """Names of the layers that have records, in the order they first reported."""
        return list(self.records)

    def __getitem__(self, name: str) -> list[RoutingRecord]:
        return self.records[name]

    def __contains__(self, name: str) -> bool:
        return name in self.records

    # ------------------------------------------------------------------------- reductions

    def load(self, name: str) -> Tensor:
        """``[N, E]`` int32: layer ``name``'s tokens per expert in each of its N recorded
        forwards (:func:`expert_load`)."""
        return expert_load(self.records[name])

    def max_violation(self, name: str) -> Tensor:
        """``[N]`` fp32: MaxVio of each of layer ``name``'s recorded forwards
        (:func:`moeyard.max_violation` of :meth:`load`); ``max_violation(load(name).sum(0))`` is
        the MaxVio of all of them together."""
        return max_violation(self.load(name))

    def entropy(self, name: str) -> Tensor:
        """``[N]``: the mean routing entropy (nats) of each of layer ``name``'s recorded
        forwards (:func:`routing_entropy` of :meth:`RoutingRecord.distribution`)."""
        return torch.stack([routing_entropy(r.distribution()) for r in self.records[name]])


def record_routing(model: nn.Module, fields: Optional[Iterable[str]] = None) -> RoutingRecorder:
    """A :class:`RoutingRecorder` of ``model``, to use as a context manager::

        with moeyard.record_routing(model) as rec:
            loss = model(x).sum()
        rec.load(rec.layers[0])
    """
    return RoutingRecorder(model, fields)


# ----------------------------------------------------------------------------- reductions


def expert_load(records: Sequence[RoutingRecord]) -> Tensor:
    """``[N, E]`` int32: the plan counts (tokens per expert, before capacity drops) of N records,
    stacked: the per-expert load over steps. ValueError if a record has none (SMEAR has no
    plan; a recorder told not to keep ``"counts"``)."""
    if not records:
        raise ValueError("expert_load needs at least one record")
    if any(r.counts is None for r in records):
        raise ValueError("expert_load needs records with counts (a plan); SMEAR routes examples "
                         "without one (see its probs)")
    return torch.stack([r.counts for r in records])


def routing_entropy(probs: Tensor) -> Tensor:
    """The mean over rows of the entropy, in nats, of the routing distributions ``probs [..., E]``
    (rows summing to 1): log E for uniform routing, 0 for one-hot. ``routing_entropy(load /
    load.sum())`` is the entropy of a load distribution instead (log E: perfectly balanced).
    0 rows give 0."""
    rows = probs.numel() // max(probs.shape[-1], 1)
    return torch.special.entr(probs).sum() / max(rows, 1)


def _top1(x: Union[RoutingRecord, Tensor]) -> Tensor:
    return x.top1() if isinstance(x, RoutingRecord) else x


def routing_fluctuation(before: Union[RoutingRecord, Tensor],
                        after: Union[RoutingRecord, Tensor]) -> Tensor:
    """Routing fluctuation (StableMoE, Dai et al. 2022): the fraction of tokens whose target
    expert differs between two routings of the same inputs, e.g. of a fixed held-out batch at two
    consecutive checkpoints. ``before`` / ``after``: records (their :meth:`RoutingRecord.top1`)
    or top-1 expert tensors ``[T]``. A scalar fp32 tensor; 0 tokens give 0."""
    a, b = _top1(before), _top1(after)
    if a.shape != b.shape:
        raise ValueError(f"routing_fluctuation compares routings of the same inputs, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)} tokens")
    return (a != b).sum().float() / max(a.numel(), 1)


def domain_distribution(records: Union[RoutingRecord, Sequence[RoutingRecord]],
                        domains: Union[Tensor, Sequence[Tensor]], num_domains: int) -> Tensor:
    """Expert distribution per domain: ``[num_domains, E]`` fp32, row d the share of domain d's
    assignments (the router's choices, capacity drops included) that went to each expert; a
    domain with no token has a row of zeros.

    ``domains``: per record, an int tensor of each token's domain in ``[0, num_domains)``, of any
    shape with T elements in the layer's token order (``[B, S]`` for a ``[B, S, d]`` input). For
    SMEAR records (``probs`` only) one label per example, and row d is the mean of its examples'
    routing probabilities. Nothing is read on the host (labels out of range raise on the CPU and
    are undefined on CUDA)."""
    if isinstance(records, RoutingRecord):
        records, domains = [records], [domains]
    if len(records) != len(domains) or not records:
        raise ValueError(f"domain_distribution needs one domain tensor per record, got "
                         f"{len(records)} records and {len(domains)} domain tensors")
    E = records[0].num_experts
    total = None
    for r, d in zip(records, domains):
        if r.experts is not None:  # each chosen (token, slot) adds 1 to (domain, expert)
            experts = r.experts.long()
            mass, columns = (experts >= 0).float(), experts.clamp(min=0)
        elif "probs" in r.extra:  # each example adds its probabilities to its domain's row
            mass = r.extra["probs"].float()
            columns = torch.arange(E, device=mass.device)
        else:
            raise ValueError("domain_distribution needs records with experts or probs")
        if d.numel() != mass.shape[0]:
            raise ValueError(f"domain labels: {d.numel()} for a record of {mass.shape[0]} rows")
        index = d.reshape(-1, 1).to(mass.device).long() * E + columns
        if total is None:
            total = torch.zeros(num_domains * E, device=mass.device)
        total.index_add_(0, index.flatten(), mass.flatten())
    total = total.view(num_domains, E)
    return total / total.sum(1, keepdim=True).clamp(min=1e-20)
