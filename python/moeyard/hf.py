"""Hugging Face transformers integration: ``import moeyard.hf``.

Importing this module (and only this one: ``import moeyard`` leaves transformers alone) does two
things: it checks that the installed transformers is one this integration was tested with
(:data:`SUPPORTED_TRANSFORMERS`; any other version raises ImportError), and it registers
``"moeyard"`` in transformers' experts-implementation registry (``ExpertsInterface``).

Two ways to use it:

``experts_implementation="moeyard"``
    ``AutoModelForCausalLM.from_pretrained(name, experts_implementation="moeyard")`` or
    ``model.set_experts_implementation("moeyard")``. The model's own routers run unchanged; every
    experts module (``gate_up_proj`` / ``down_proj`` or ``up_proj``, their biases, nn.Linear or
    transposed layouts, GPT-OSS's interleaved gate/up) runs as one :func:`moeyard.expert_ffn`
    that reads the parameters where they are (no copy, no host synchronization).

:func:`replace_moe`
    Swaps every sparse MoE block (router + experts + optional shared expert) for a
    :class:`SparseMoeBlock` that routes with :func:`moeyard.route` and :func:`moeyard.plan` too,
    reusing the block's parameters and keeping their names (a replaced model's ``state_dict`` loads
    into the original and back). By default it keeps the model's routing exactly; options switch
    it for fine-tuning (auxiliary-loss-free balancing, capacity). Router logits are still recorded
    for ``output_router_logits`` (and the model's aux loss).

An experts module or MoE block this integration cannot reproduce exactly (an activation or gate it
does not know, a post-expert norm, an unknown router) is refused with an error that names it;
nothing falls back silently.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import TopKMoE
from .ops import expert_ffn, load_stats, plan
from .reference import OSS_ALPHA, OSS_LIMIT
from .routers import TopKRouter

#: transformers versions this integration is tested with: ``[low, high)``. The CPU tests run on
#: the newest (what the Makefile installs), the GPU tests on the GPU machine's (5.17).
SUPPORTED_TRANSFORMERS = ("5.17", "5.24")
_PIN = f"transformers>={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]}"
_ALLOW_ENV = "MOEYARD_HF_ALLOW_UNTESTED"

try:
    import transformers
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"moeyard.hf needs transformers: pip install '{_PIN}'") from e

from packaging.version import Version  # noqa: E402  (a dependency of transformers)


def _check_version(version: str) -> None:
    low, high = (Version(v) for v in SUPPORTED_TRANSFORMERS)
    if low <= Version(version) < high:
        return
    msg = (f"moeyard.hf supports {_PIN}; transformers {version} is installed. The integration "
           "reads transformers' MoE modules and registries, which change between releases; "
           f"install a supported version (pip install '{_PIN}').")
    if os.environ.get(_ALLOW_ENV) != "1":
        raise ImportError(msg + f" To try it anyway, set {_ALLOW_ENV}=1 (and run moeyard's "
                          "tests/test_hf.py with it).")
    warnings.warn(msg + f" Going on because {_ALLOW_ENV}=1: results are unverified.",
                  stacklevel=3)


_check_version(transformers.__version__)

from transformers.integrations import moe as _hf_moe  # noqa: E402
from transformers.utils import output_capturing as _hf_capture  # noqa: E402


# ------------------------------------------------------------------------- experts functions

# transformers' activation modules, by class name, as moeyard activation names. Gated experts
# (``has_gate``) apply the activation to the gate half and multiply by the up half.
_GATED_ACTIVATIONS = {"SiLU": "swiglu", "SiLUActivation": "swiglu"}
_ACTIVATIONS = {"ReLU": "relu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                "GELUPytorchTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh"}


def _torch_gelu_name(act: nn.Module) -> Optional[str]:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return None


def _is_oss_gate(module: nn.Module) -> bool:
    """GPT-OSS's gate: interleaved gate/up, clamped, ``(up + 1) * gate * sigmoid(alpha gate)``,
    with the alpha and limit moeyard's ``swiglu_oss`` kernel implements."""
    return (type(module).__name__ == "GptOssExperts" and not module.is_concatenated
            and float(getattr(module, "alpha", -1)) == OSS_ALPHA
            and float(getattr(module, "limit", -1)) == OSS_LIMIT)


def experts_activation(module: nn.Module) -> str:
    """The moeyard activation (see :data:`moeyard.ACTIVATIONS`) that reproduces a transformers
    experts module (one decorated with ``use_experts_implementation``); NotImplementedError,
    naming what is not supported, if none does."""
    name = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(f"moeyard cannot run {name}: it normalizes each expert's "
                                  "output (has_post_expert_norm)")
    act = getattr(module, "act_fn", None)
    act_name = type(act).__name__
    if module.has_gate:
        if type(module)._apply_gate is not _hf_moe._default_apply_gate:
            if _is_oss_gate(module):
                return "swiglu_oss"
            raise NotImplementedError(f"moeyard cannot run {name}: its gate ({name}._apply_gate) "
                                      "is not one moeyard implements")
        if not module.is_concatenated:
            raise NotImplementedError(f"moeyard cannot run {name}: interleaved gate/up with the "
                                      "default gate")
        if act_name in _GATED_ACTIVATIONS:
            return _GATED_ACTIVATIONS[act_name]
        raise NotImplementedError(f"moeyard cannot run {name}: gated activation {act_name} "
                                  "(moeyard's gated experts are SwiGLU)")
    found = _ACTIVATIONS.get(act_name) or _torch_gelu_name(act)
    if found is None:
        raise NotImplementedError(f"moeyard cannot run {name}: activation {act_name}")
    return found


def _expert_params(module: nn.Module):
    if module.has_gate:
        w1, b1 = module.gate_up_proj, getattr(module, "gate_up_proj_bias", None)
    else:
        w1, b1 = module.up_proj, getattr(module, "up_proj_bias", None)
    w2, b2 = module.down_proj, getattr(module, "down_proj_bias", None)
    if not module.has_bias:
        b1 = b2 = None
    return w1, w2, b1, b2


def run_experts(module: nn.Module, hidden_states: Tensor, routing_plan, weights: Tensor) -> Tensor:
    """A transformers experts module's MLPs and the combine for a moeyard plan, as one
    :func:`moeyard.expert_ffn` on the module's own parameters; ``[T, d]`` in hidden_states'
    dtype (the experts run in the parameters' dtype, as transformers' grouped_mm does)."""
    w1, w2, b1, b2 = _expert_params(module)
    x = hidden_states.to(w1.dtype)
    out = expert_ffn(x, routing_plan, weights, w1, w2, b1, b2, experts_activation(module),
                     layout="matmul" if module.is_transposed else "linear")
    return out.to(hidden_states.dtype)


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> Tensor:
    """transformers' experts-implementation signature: ``hidden_states [T, d]``,
    ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, d]``. Registered as ``"moeyard"``.
    Expert ids >= num_experts (transformers' sentinel for "another rank's expert" under expert
    parallelism) add nothing, as in transformers' own implementations."""
    num_experts = _expert_params(self)[0].shape[0]
    experts = top_k_index.masked_fill(top_k_index >= num_experts, -1)
    return run_experts(self, hidden_states, plan(experts, num_experts), top_k_weights)


_hf_moe.ExpertsInterface.register("moeyard", experts_forward)


# ------------------------------------------------------------------------------ replace_moe


@dataclass(frozen=True)
class _Routing:
    """How a transformers router routes, in :func:`moeyard.route`'s terms (plus where its
    numbers are rounded, so that a bf16 model gives the same results).

    score, topk_before_score: as :func:`moeyard.route`.
    renormalize: True / False, or None: the router's ``norm_topk_prob`` attribute says.
    grouped: the router has DeepSeek-V3's ``num_group`` / ``topk_group`` / ``routed_scaling_factor``
        / ``e_score_correction_bias`` (group-limited, scaled, selection bias).
    logits_fp32: the router computes its logits from fp32 copies of x and W (else in x's dtype,
        as ``F.linear(x, W)``; those logits are what transformers records).
    weights_to_hidden: the routing weights are rounded to x's dtype before the experts.
    """

    score: str = "softmax"
    topk_before_score: bool = False
    renormalize: Optional[bool] = None
    grouped: bool = False
    logits_fp32: bool = False
    weights_to_hidden: bool = True


_MIXTRAL = _Routing(renormalize=True, weights_to_hidden=False)
_QWEN = _Routing()
_DEEPSEEK_V3 = _Routing(score="sigmoid", grouped=True, logits_fp32=True, weights_to_hidden=False)
_GPT_OSS = _Routing(topk_before_score=True)

#: transformers' sparse MoE block classes (by name) that :func:`replace_moe` swaps, and how each
#: routes. Each is a router (``gate`` or ``router``), an experts module (``experts``) and
#: optionally a shared expert (``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))``,
#: or ``shared_experts`` added as is); tests/test_hf.py compares every one with transformers.
SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": _MIXTRAL,
    "MiniMaxSparseMoeBlock": _MIXTRAL,
    "Qwen2MoeSparseMoeBlock": _QWEN,
    "Qwen3MoeSparseMoeBlock": _QWEN,
    "Qwen3NextSparseMoeBlock": _QWEN,
    "Qwen3_5MoeSparseMoeBlock": _QWEN,
    "Qwen3VLMoeTextSparseMoeBlock": _QWEN,
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": _QWEN,
    "Qwen4ExpTextSparseMoeBlock": _QWEN,
    "OlmoeSparseMoeBlock": _QWEN,
    "FlexOlmoSparseMoeBlock": _QWEN,
    "MellumSparseMoeBlock": _QWEN,
    "JambaSparseMoeBlock": replace(_QWEN, renormalize=False),
    "DeepseekV3MoE": _DEEPSEEK_V3,
    "DeepseekV32MoE": _DEEPSEEK_V3,
    "Dots1MoE": _DEEPSEEK_V3,
    "Glm4MoeMoE": _DEEPSEEK_V3,
    "Glm4MoeLiteMoE": _DEEPSEEK_V3,
    "Glm4vMoeTextMoE": _DEEPSEEK_V3,
    "GlmMoeDsaMoE": _DEEPSEEK_V3,
    "SolarOpenMoE": _DEEPSEEK_V3,
    "ExaoneMoeSparseMoEBlock": _DEEPSEEK_V3,
    "KimiLinearMoE": _DEEPSEEK_V3,
    "BailingHybridMoE": _DEEPSEEK_V3,
    "MiMoV2FlashMoE": _DEEPSEEK_V3,
    "GptOssMLP": _GPT_OSS,
}


# Blocks whose forward returns (out, router_scores [T, k]) instead of out
_RETURNS_ROUTER_SCORES = {"GptOssMLP"}


class HFRouter(TopKRouter):
    """A transformers router run by :func:`moeyard.route`: it holds the original router's
    parameters and buffers under their names (``weight``, ``bias``, ``e_score_correction_bias``)
    and computes its logits as the original does (in x's dtype or in fp32), so the logits that
    transformers records for ``output_router_logits`` are the same.

    ``forward(x [T, d]) -> (logits [T, E], weights [T, k] fp32, experts [T, k] int32)``.
    """

    def __init__(self, hf_router: nn.Module, routing: _Routing, k: int, *,
                 bias_balancing: bool = False):
        weight = hf_router.weight
        num_experts, hidden_size = weight.shape
        renormalize = routing.renormalize
        if renormalize is None:
            renormalize = bool(getattr(hf_router, "norm_topk_prob", True))
        grouped = {}
        if routing.grouped:
            grouped = dict(n_group=hf_router.num_group or 1, topk_group=hf_router.topk_group or 1,
                           scale=float(hf_router.routed_scaling_factor))
        hf_bias = getattr(hf_router, "e_score_correction_bias", None)
        super().__init__(hidden_size, num_experts, k, routing.score,
                         topk_before_score=routing.topk_before_score, renormalize=renormalize,
                         bias_balancing=bias_balancing or hf_bias is not None, device="meta",
                         **grouped)
        self.logits_fp32 = routing.logits_fp32
        self.weight = weight
        self.bias = getattr(hf_router, "bias", None)
        device = weight.device
        if hf_bias is not None:  # kept in fp32 (transformers keeps it so when loading)
            self.e_score_correction_bias = hf_bias.detach().float()
        elif bias_balancing:
            self.e_score_correction_bias = torch.zeros(num_experts, device=device)
        self.load_since_update = (torch.zeros(num_experts, device=device, dtype=torch.int64)
                                  if bias_balancing else None)

    def router_logits(self, x: Tensor) -> Tensor:
        if self.logits_fp32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        return F.linear(x, self.weight, self.bias)


class SparseMoeBlock(nn.Module):
    """moeyard's replacement of a transformers sparse MoE block (see :func:`replace_moe`).

    The children keep the original block's names: the router (``gate`` or ``router``, an
    :class:`HFRouter` holding the original's parameters), ``experts`` (the original experts
    module, run by :func:`moeyard.expert_ffn`) and the shared expert modules (the originals). So
    ``state_dict`` keys are unchanged. ``forward`` returns what the original returns (GPT-OSS:
    ``(out, routing weights)``). After each forward, ``last_stats`` holds
    :func:`moeyard.load_stats` of the plan and ``aux_losses`` is empty (transformers computes its
    aux loss from the recorded router logits).
    """

    def __init__(self, block: nn.Module, routing: _Routing, *, bias_balancing: bool = False,
                 capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4):
        super().__init__()
        self.source = type(block).__name__
        self.router_name = "gate" if hasattr(block, "gate") else "router"
        hf_router = getattr(block, self.router_name)
        # the router holds k (transformers 5.17's Jamba: a plain nn.Linear, k on the block)
        k = getattr(hf_router, "top_k", None) or getattr(block, "top_k", None)
        if k is None or getattr(hf_router, "weight", None) is None:
            raise NotImplementedError(f"replace_moe cannot read the router of {self.source} in "
                                      f"transformers {transformers.__version__}")
        router = HFRouter(hf_router, routing, k, bias_balancing=bias_balancing)
        setattr(self, self.router_name, router)
        self.experts = block.experts
        experts_activation(self.experts)  # refuse now, not at the first forward
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.shared_experts = getattr(block, "shared_experts", None)
        self.num_experts, self.k = router.num_experts, router.k
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.weights_to_hidden = routing.weights_to_hidden
        self.returns_weights = self.source in _RETURNS_ROUTER_SCORES
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}

    def hf_router(self) -> HFRouter:
        """The router (``gate`` or ``router``, as the original block names it)."""
        return self._modules[self.router_name]

    # the same capacity rule as TopKMoE's, over the same attributes
    capacity = TopKMoE.capacity

    def forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:  # Mixtral's jitter: router and experts
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router = self.hf_router()
        _, weights, experts = router(h)
        if self.weights_to_hidden:
            weights = weights.to(h.dtype)
        routing_plan = plan(experts, self.num_experts, self.capacity(h.shape[0]))
        out = run_experts(self.experts, h, routing_plan, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(h)
        router.record_load(routing_plan.counts)
        self.last_stats = load_stats(routing_plan)
        out = out.view(shape)
        return (out, weights) if self.returns_weights else out

    def extra_repr(self) -> str:
        return (f"source={self.source}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}")


def _owned_blocks(model: nn.Module):
    """(parent, name, qualified name, block) of every MoE block: a module with an ``experts``
    child of transformers' experts kind (decorated by ``use_experts_implementation``)."""
    for qual, parent in model.named_modules():
        for name, child in parent.named_children():
            experts = getattr(child, "experts", None)
            if isinstance(child, SparseMoeBlock) or not hasattr(experts, "has_gate"):
                continue
            yield parent, name, f"{qual}.{name}" if qual else name, child


def _record_router_logits(model: nn.Module) -> None:
    """Make transformers record the HFRouters' logits wherever it records router logits: add an
    ``OutputRecorder(HFRouter, index=0)`` to each model class's recording table that has a
    ``router_logits`` entry, and hook the routers of models whose hooks are already installed."""
    from transformers import PreTrainedModel
    registry = _hf_capture._CAN_RECORD_REGISTRY
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        key = str(type(sub))
        table = dict.get(registry, key) or {}
        if "router_logits" not in table:
            continue
        specs = table["router_logits"]
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        if not any(getattr(s, "target_class", None) is HFRouter for s in specs):
            ours = _hf_capture.OutputRecorder(HFRouter, index=0)
            dict.__setitem__(registry, key, {**table, "router_logits": specs + [ours]})
        if getattr(sub, "_output_capturing_hooks_installed", False):
            for module in sub.modules():
                if isinstance(module, HFRouter) and not getattr(module, "_moeyard_recorded", False):
                    _hf_capture.install_output_capuring_hook(module, "router_logits", 0)
                    module._moeyard_recorded = True


def replace_moe(model: nn.Module, *, bias_balancing: bool = False,
                capacity_factor: Optional[float] = None,
                eval_capacity_factor: Optional[float] = None,
                min_capacity: int = 4) -> list[str]:
    """Swap every sparse MoE block of a transformers model for a :class:`SparseMoeBlock`, in
    place; returns the qualified names of the swapped blocks.

    The new blocks reuse the original parameters (the same ``nn.Parameter`` objects, under the same
    ``state_dict`` keys) and, by default, route exactly as the originals (softmax or sigmoid,
    renormalization, group limits, ``e_score_correction_bias``, scaling, router bias), with
    :func:`moeyard.route`, :func:`moeyard.plan` and :func:`moeyard.expert_ffn`. Router logits are
    still recorded for ``output_router_logits`` (so the model's aux loss is unchanged).

    Options, for fine-tuning:
        bias_balancing: auxiliary-loss-free balancing: each router gets a trainable selection bias
            ``e_score_correction_bias`` (DeepSeek-V3 style models already have one; others get
            zeros, a new ``state_dict`` key) and counts its load; call
            ``moeyard.BiasBalancer(model).step()`` after each optimizer step. Default False.
        capacity_factor, eval_capacity_factor, min_capacity: per-expert capacity in training / in
            eval, as :class:`moeyard.TopKMoE`; over-capacity assignments are dropped by position.
            Default None: dropless, as transformers.

    Supported blocks: :data:`SUPPORTED_BLOCKS`. A model with any other MoE block raises
    NotImplementedError before anything is changed; a model with none raises ValueError.
    """
    found = list(_owned_blocks(model))
    unsupported = sorted({type(b).__name__ for *_, b in found
                          if type(b).__name__ not in SUPPORTED_BLOCKS})
    if unsupported:
        raise NotImplementedError(
            f"replace_moe cannot reproduce {', '.join(unsupported)} (supported: "
            f"{', '.join(SUPPORTED_BLOCKS)}); model.set_experts_implementation('moeyard') runs the "
            "experts of any model on moeyard and keeps its own routing")
    if not found:
        raise ValueError(f"replace_moe: {type(model).__name__} has no sparse MoE block")
    new = [SparseMoeBlock(block, SUPPORTED_BLOCKS[type(block).__name__],
                          bias_balancing=bias_balancing, capacity_factor=capacity_factor,
                          eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity)
           for *_, block in found]  # built first: a refusal leaves the model untouched
    for (parent, name, _, block), moe in zip(found, new):
        moe.train(block.training)
        setattr(parent, name, moe)
    _record_router_logits(model)
    return [qual for _, _, qual, _ in found]
