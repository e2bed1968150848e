"""Hugging Face transformers integration: ``import moeyard.hf``.

Importing this module (and only this one: ``import moeyard`` leaves transformers alone) does two
things: it checks the installed transformers against the releases this integration is tested with
(:data:`SUPPORTED_TRANSFORMERS`: an older one raises ImportError, a newer one gets a warning), and
it registers ``"moeyard"`` in transformers' experts-implementation registry (``ExpertsInterface``).

Two ways to use it:

``experts_implementation="moeyard"``
    ``AutoModelForCausalLM.from_pretrained(name, experts_implementation="moeyard")`` or
    ``model.set_experts_implementation("moeyard")``. The model's own routers run unchanged; every
    experts module (``gate_up_proj`` / ``down_proj`` or ``up_proj``, their biases, nn.Linear or
    transposed layouts, any elementwise activation of :data:`moeyard.ACTIVATIONS`, gated or not,
    GPT-OSS's interleaved gate/up) runs as one :func:`moeyard.expert_ffn` that reads the
    parameters where they are (no copy, no host synchronization).

:func:`replace_moe`
    Turns every sparse MoE block (router + experts + optional shared expert), in place, into a
    :class:`SparseMoeBlock` that routes with :func:`moeyard.route` (PhiMoE:
    :func:`moeyard.sparsemixer`) and :func:`moeyard.plan`, keeping the block's modules and
    parameters under their names (a replaced model's ``state_dict`` loads into the original and
    back). By default it routes exactly as the original (up to exact ties, see :class:`HFRouter`;
    PhiMoE samples in training, from the same draws as transformers after the same seed); options
    switch it for fine-tuning (auxiliary-loss-free balancing, capacity). The experts run on the
    model's experts implementation, ``"moeyard"`` unless asked otherwise. Router logits are still
    recorded for ``output_router_logits`` (and the model's aux loss), and transformers still
    initialises the routers (``init_weights()``, loading with missing keys). With ``ep_group``
    the experts are sharded over a process group (expert parallelism, :mod:`moeyard.distributed`).

An experts module or MoE block this integration cannot reproduce exactly (an activation or gate it
does not know, a post-expert norm, an unknown router) is refused with an error that names it;
nothing falls back silently.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import ExpertParallel, shard_parameters
from .layers import TopKMoE
from .ops import expert_ffn, load_stats, plan, sparsemixer
from .reference import OSS_ALPHA, OSS_LIMIT, activation_name
from .routers import TopKRouter
from .telemetry import report_routing

#: transformers releases this integration is tested with: the oldest and the newest minor release
#: (CI runs tests/test_hf.py on both). Older releases lack what it reads and are refused; newer ones
#: are allowed with a warning (it detects the features it needs, and refuses what it cannot read).
SUPPORTED_TRANSFORMERS = ("5.17", "5.24")
_PIN = f"transformers>={SUPPORTED_TRANSFORMERS[0]}"

try:
    import transformers
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"moeyard.hf needs transformers: pip install '{_PIN}'") from e

from packaging.version import Version  # noqa: E402  (a dependency of transformers)


def _check_version(version: str) -> None:
    """ImportError for a transformers older than the oldest tested release; a warning for one newer
    than the newest tested minor release (5.24.x passes, 5.25.0.dev0 warns)."""
    low, high = SUPPORTED_TRANSFORMERS
    tested = f"transformers {low} to {high}.x"
    v = Version(version)
    if v < Version(low):
        raise ImportError(f"moeyard.hf needs {_PIN}; transformers {version} is installed "
                          f"(tested: {tested}). pip install -U '{_PIN}'")
    if v.release[:2] > Version(high).release[:2]:
        warnings.warn(f"moeyard.hf is tested with {tested}; transformers {version} is newer. "
                      "It reads transformers' MoE modules, which can change between releases: "
                      "anything it cannot read is refused with an error, but run moeyard's "
                      "tests/test_hf.py to be sure.", stacklevel=3)


_check_version(transformers.__version__)

try:  # what this integration reads of transformers, checked once (newer releases may move it)
    from transformers.integrations import moe as _hf_moe  # noqa: E402
    _hf_moe.ALL_EXPERTS_FUNCTIONS, _hf_moe.ExpertsInterface, _hf_moe._default_apply_gate
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the release
    raise ImportError(f"moeyard.hf: transformers {transformers.__version__} has no experts "
                      "implementation registry as moeyard knows it (transformers.integrations.moe"
                      f".ExpertsInterface); tested: transformers {SUPPORTED_TRANSFORMERS[0]} to "
                      f"{SUPPORTED_TRANSFORMERS[1]}.x") from e


# ------------------------------------------------------------------------- experts functions

# transformers' (and torch's) activation modules, by class name, as the elementwise functions of
# moeyard's activation table (reference.ACTIVATIONS). Gated experts (``has_gate``, transformers'
# default gate ``act_fn(gate) * up``) take the table's gated activation of that function.
_ACTIVATION_FUNCTIONS = {
    "SiLU": "silu", "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "GELUPytorchTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "ReLU": "relu", "ReLUSquaredActivation": "relu2", "QuickGELUActivation": "quick_gelu",
    "LinearActivation": "identity", "Identity": "identity",
}


def _activation_function(act: nn.Module) -> Optional[str]:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _ACTIVATION_FUNCTIONS.get(type(act).__name__)


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
    fn = _activation_function(act)
    try:
        return activation_name(fn, gated=module.has_gate)
    except ValueError:
        raise NotImplementedError(f"moeyard cannot run {name}: {'gated ' * module.has_gate}"
                                  f"activation {act_name} (moeyard's: "
                                  f"{', '.join(sorted(set(_ACTIVATION_FUNCTIONS.values())))})"
                                  ) from None


def _expert_params(module: nn.Module):
    if module.has_gate:
        w1, b1 = module.gate_up_proj, getattr(module, "gate_up_proj_bias", None)
    else:
        w1, b1 = module.up_proj, getattr(module, "up_proj_bias", None)
    w2, b2 = module.down_proj, getattr(module, "down_proj_bias", None)
    if not module.has_bias:
        b1 = b2 = None
    return w1, w2, b1, b2


def _expert_parallel(module: nn.Module) -> Optional[ExpertParallel]:
    """The exchange of an experts module :func:`replace_moe` sharded (``ep_group``), else None."""
    ep = getattr(module, "ep", None)
    return ep if isinstance(ep, ExpertParallel) else None


def _local_experts(module: nn.Module, hidden_states: Tensor, routing_plan,
                   weights: Tensor) -> Tensor:
    """One :func:`moeyard.expert_ffn` on the experts ``module`` holds, for a plan over them."""
    w1, w2, b1, b2 = _expert_params(module)
    x = hidden_states.to(w1.dtype)
    out = expert_ffn(x, routing_plan, weights, w1, w2, b1, b2, experts_activation(module),
                     layout="matmul" if module.is_transposed else "linear")
    return out.to(hidden_states.dtype)


def run_experts(module: nn.Module, hidden_states: Tensor, routing_plan, weights: Tensor) -> Tensor:
    """A transformers experts module's MLPs and the combine for a moeyard plan, as one
    :func:`moeyard.expert_ffn` on the module's own parameters; ``[T, d]`` in hidden_states'
    dtype (the experts run in the parameters' dtype, as transformers' grouped_mm does).

    A module sharded by ``replace_moe(ep_group=...)`` (expert parallelism) takes a plan over the
    E global experts and the call is collective: its :class:`moeyard.distributed.ExpertParallel`
    sends the rows to the ranks that hold their experts, which run that expert_ffn on their own
    slice, and brings the results back."""
    ep = _expert_parallel(module)
    if ep is None:
        return _local_experts(module, hidden_states, routing_plan, weights)
    return ep(hidden_states, routing_plan, weights, functools.partial(_local_experts, module))


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> Tensor:
    """transformers' experts-implementation signature: ``hidden_states [T, d]``,
    ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, d]``. Registered as ``"moeyard"``.
    Expert ids >= num_experts (transformers' sentinel for "another rank's expert" under expert
    parallelism) add nothing, as in transformers' own implementations. On a module sharded by
    ``replace_moe(ep_group=...)`` the ids are global and the call is collective (see
    :func:`run_experts`)."""
    ep = _expert_parallel(self)
    num_experts = _expert_params(self)[0].shape[0] if ep is None else ep.num_experts
    experts = top_k_index.masked_fill(top_k_index >= num_experts, -1)
    return run_experts(self, hidden_states, plan(experts, num_experts), top_k_weights)


_hf_moe.ExpertsInterface.register("moeyard", experts_forward)


# ------------------------------------------------------------------------------ replace_moe


@dataclass(frozen=True)
class _Routing:
    """How a transformers router routes, in :func:`moeyard.route`'s terms (plus where its
    numbers are rounded, so that a bf16 model gives the same results).

    score, topk_before_score: as :func:`moeyard.route`; score ``"sparsemixer"``: GRIN's routing
        (:func:`moeyard.sparsemixer`, window ``router_jitter_noise``, always two experts).
    renormalize: True / False, or None: the router's ``norm_topk_prob`` attribute says.
    grouped: the router has DeepSeek-V3's ``num_group`` / ``topk_group`` / ``routed_scaling_factor``
        / ``e_score_correction_bias`` (group-limited, scaled, selection bias).
    logits_fp32: the router computes its logits from fp32 copies of x and W (else in x's dtype,
        as ``F.linear(x, W)``; those logits are what transformers records).
    weights_to_hidden: the routing weights are rounded to x's dtype before the experts.
    router_jitters_input: the router multiplies its input in place by its own
        ``input_jitter_noise`` in training (PhiMoE), so the experts see that jitter too: the block
        draws it, after its own.
    """

    score: str = "softmax"
    topk_before_score: bool = False
    renormalize: Optional[bool] = None
    grouped: bool = False
    logits_fp32: bool = False
    weights_to_hidden: bool = True
    router_jitters_input: bool = False


_MIXTRAL = _Routing(renormalize=True, weights_to_hidden=False)
_QWEN = _Routing()
_DEEPSEEK_V3 = _Routing(score="sigmoid", grouped=True, logits_fp32=True, weights_to_hidden=False)
_GPT_OSS = _Routing(topk_before_score=True)
_PHIMOE = _Routing(score="sparsemixer", renormalize=False, router_jitters_input=True)

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
    "PhimoeSparseMoeBlock": _PHIMOE,
}


# Blocks whose forward returns (out, router_scores [T, k]) instead of out
_RETURNS_ROUTER_SCORES = {"GptOssMLP"}


class HFRouter(TopKRouter):
    """A transformers router that routes with :func:`moeyard.route` (PhiMoE's:
    :func:`moeyard.sparsemixer`).

    :func:`replace_moe` does not build a new router: it changes the class of the model's own
    router to a subclass of both its class and this one (``Moeyard<Class>``, see
    :func:`moeyard_class`). So the router keeps its parameters, buffers and hooks, and stays an
    instance of its transformers class: transformers still initialises it (``_init_weights``)
    and records its logits for ``output_router_logits``. ``forward(x [T, d]) -> (logits [T, E],
    weights [T, k] fp32, experts [T, k] int32)``; the logits are computed as the original computes
    them (in x's dtype, or in fp32), so the recorded logits are the same.

    The routing is transformers' rule, with these documented differences:

    * exact ties at the k-th score go to the lower expert index (moeyard's rule); transformers'
      ``torch.topk`` picks among tied experts in an order of its own. Rare in fp32, a fraction of a
      percent of tokens in bf16 (see the README).
    * group-limited routers (DeepSeek-V3 and its kin) whose k exceeds the experts of the kept
      groups: transformers masks the other groups with -inf and ``topk`` still takes k experts,
      the rest from the masked groups in its own tie order. :func:`moeyard.route` refuses such a
      k, so these routers run transformers' own ops instead (op for op; a warning says so once).
    * PhiMoE (sparsemixer) in bf16 / fp16: transformers computes the window, the Gumbel-perturbed
      logits and the softmax in the model's dtype, moeyard in fp32 (the weights are rounded to the
      model's dtype afterwards), so weights differ by that rounding and, rarely, a logit on the
      window's edge or a near-tied sample goes the other way. In fp32 the two agree (fed the same
      random draws in training). Always two experts, as transformers' sparsemixer, whatever
      ``num_experts_per_tok`` says.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("HFRouter is not built: replace_moe turns a transformers router into one "
                        "(HFRouter.adopt)")

    @classmethod
    def adopt(cls, hf_router: nn.Module, routing: _Routing, k: int, *,
              bias_balancing: bool = False, sparsemixer_eps: float = 0.01) -> "HFRouter":
        """Turn ``hf_router`` (in place) into an HFRouter routing as ``routing`` says
        (``sparsemixer_eps``: the window of a sparsemixer router, see :func:`_sparsemixer_eps`)."""
        weight = hf_router.weight
        num_experts, hidden_size = weight.shape
        renormalize = routing.renormalize
        if renormalize is None:
            renormalize = bool(getattr(hf_router, "norm_topk_prob", True))
        n_group = topk_group = 1
        scale = 1.0
        if routing.grouped:
            n_group, topk_group = hf_router.num_group or 1, hf_router.topk_group or 1
            scale = float(hf_router.routed_scaling_factor)
        if routing.score == "sparsemixer":  # transformers' sparsemixer always routes two
            k = 2
        hf_bias = getattr(hf_router, "e_score_correction_bias", None)
        hf_router.__class__ = moeyard_class(cls, type(hf_router))
        self = hf_router
        # what TopKRouter.__init__ sets, over the router's own parameters
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.jitter_eps, self.initializer_range = 0.0, 0.02
        self.score, self.topk_before_score = routing.score, routing.topk_before_score
        self.renormalize, self.scale = renormalize, scale
        self.n_group, self.topk_group = n_group, topk_group
        self.sparsemixer_eps, self.generator = sparsemixer_eps, None
        self.logits_fp32 = routing.logits_fp32
        self.bias = getattr(self, "bias", None)
        device = weight.device
        if hf_bias is not None:  # fp32, as transformers keeps it when loading
            if hf_bias.dtype != torch.float32:
                self.e_score_correction_bias = hf_bias.float()
        elif bias_balancing:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, device=device))
        else:
            self.e_score_correction_bias = None
        if bias_balancing:
            self.register_buffer("load_since_update",
                                 torch.zeros(num_experts, device=device, dtype=torch.int64),
                                 persistent=False)
        else:
            self.load_since_update = None
        # k beyond the kept groups' experts: transformers' ops (see the class docstring)
        self.transformers_grouped_topk = k > topk_group * (num_experts // n_group)
        if self.transformers_grouped_topk:
            warnings.warn(
                f"replace_moe: {type(self).__name__} routes k={k} experts from "
                f"topk_group={topk_group} of {n_group} groups of {num_experts // n_group} experts; "
                "moeyard.route refuses that, so this router runs transformers' own ops (the "
                "remaining experts come from the masked groups in torch.topk's order)")
        return self

    def router_logits(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.hidden_size)
        if self.logits_fp32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.score == "sparsemixer" and self.training:
            logits = self.router_logits(x)
            weights, experts = sparsemixer(logits, self.sparsemixer_eps, True,
                                           noise=self._transformers_noise(logits))
            return logits, weights, experts
        if not self.transformers_grouped_topk:
            return super().forward(x)
        logits = self.router_logits(x)
        return (logits, *self._transformers_grouped_topk(logits))

    def _transformers_noise(self, logits: Tensor) -> Tensor:
        """sparsemixer's training draws (:func:`moeyard.sparsemixer_noise`'s layout) drawn as
        transformers' PhiMoE draws them: in the logits' dtype and in its order (slot 1: an
        Exponential(1) ``[T, E]``, a uniform ``[T, 1]``; slot 2: an Exponential ``[T, E]``, a
        uniform ``[T, 1]`` that transformers overwrites, the uniform it uses), from ``generator``
        or the global generator. So a replaced model samples what the original samples after the
        same ``torch.manual_seed`` (in bf16, up to near-ties: see the class docstring)."""
        T, E = logits.shape
        kw = dict(dtype=logits.dtype, device=logits.device)
        noise = torch.empty(T, 2, E + 1, device=logits.device)
        for j in range(2):
            exponential = torch.empty(T, E, **kw).exponential_(generator=self.generator)
            noise[:, j, :E] = exponential.log().neg()
            if j == 1:  # transformers' rand_like(...).uniform_(): the first draw is overwritten
                torch.rand(T, 1, generator=self.generator, **kw)
            noise[:, j, E:] = torch.rand(T, 1, generator=self.generator, **kw)
        return noise

    def _transformers_grouped_topk(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """transformers' group-limited sigmoid routing (DeepseekV3TopkRouter.forward), op for op."""
        E, G = self.num_experts, self.n_group
        scores = logits.float().sigmoid()
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        keep = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
        choice = choice.masked_fill(~keep, float("-inf"))
        experts = torch.topk(choice, k=self.k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, experts.int()


_CLASSES: dict = {}


def moeyard_class(mixin: type, cls: type) -> type:
    """``Moeyard<cls>``: the subclass of ``mixin`` (:class:`HFRouter` or :class:`SparseMoeBlock`)
    and the transformers class ``cls`` that :func:`replace_moe` gives a router or a block in place
    (one per class; also reachable as ``moeyard.hf.Moeyard<cls>``, so a pickled model loads in a
    process that replaced the same kind of model)."""
    if issubclass(cls, mixin):
        return cls
    if (mixin, cls) not in _CLASSES:
        name = f"Moeyard{cls.__name__}"
        new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        _CLASSES[mixin, cls] = new
        globals().setdefault(name, new)
    return _CLASSES[mixin, cls]


def _experts_implementation(experts: nn.Module) -> str:
    """The experts implementation transformers dispatches ``experts`` to (its config's)."""
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) or "eager"


class SparseMoeBlock(nn.Module):
    """moeyard's sparse MoE block, as :func:`replace_moe` makes a transformers block.

    Like the router (:class:`HFRouter`), the block is not rebuilt: its class becomes
    ``Moeyard<Class>``, a subclass of both its transformers class and this one (see
    :func:`moeyard_class`), so it keeps its children (the router ``gate`` or ``router``, now an
    :class:`HFRouter`, ``experts``, the shared expert modules), their parameters and
    ``state_dict`` keys, and stays an instance of its class (transformers' ``_init_weights`` and
    output recorders that look for it still find it). Routing: :func:`moeyard.route` (in the
    router) and :func:`moeyard.plan`. The experts run on the model's experts implementation
    (``config._experts_implementation``, set by ``model.set_experts_implementation``):
    ``"moeyard"`` runs :func:`moeyard.expert_ffn` on the plan; any other (``"eager"``,
    ``"grouped_mm"``, ...) runs the experts module as transformers would, on the same routing
    (capacity and expert parallelism need ``"moeyard"``). With expert parallelism
    (``replace_moe(ep_group=...)``) the experts module holds this rank's slice and the forward is
    collective (see :func:`replace_moe`). ``forward`` returns what the original returns (GPT-OSS:
    ``(out, routing weights)``). After each forward, ``last_stats`` holds :func:`moeyard.load_stats`
    of the plan (this rank's tokens) and ``aux_losses`` is empty (transformers computes its aux
    loss from the recorded router logits); the routing goes to :func:`moeyard.report_routing`
    (recorded by :func:`moeyard.record_routing`, under the block's qualified name).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("SparseMoeBlock is not built: replace_moe turns a transformers block into "
                        "one (SparseMoeBlock.adopt)")

    @classmethod
    def adopt(cls, block: nn.Module, routing: _Routing, *, bias_balancing: bool = False,
              capacity_factor: Optional[float] = None,
              eval_capacity_factor: Optional[float] = None,
              min_capacity: int = 4) -> "SparseMoeBlock":
        """Turn ``block`` (in place) into a SparseMoeBlock routing as ``routing`` says."""
        source, router_name, k = type(block).__name__, _router_name(block), _router_k(block)
        jitters = _input_jitters(block, getattr(block, router_name), routing)
        eps = _sparsemixer_eps(block) if routing.score == "sparsemixer" else 0.01
        router = HFRouter.adopt(getattr(block, router_name), routing, k,
                                bias_balancing=bias_balancing, sparsemixer_eps=eps)
        block.__class__ = moeyard_class(cls, type(block))
        self = block
        self.source, self.router_name = source, router_name
        for name in ("shared_expert", "shared_expert_gate", "shared_experts"):
            if not hasattr(self, name):
                setattr(self, name, None)
        self.num_experts, self.k = router.num_experts, router.k
        self.input_jitters = jitters
        self.weights_to_hidden = routing.weights_to_hidden
        self.returns_weights = source in _RETURNS_ROUTER_SCORES
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}
        return self

    def hf_router(self) -> HFRouter:
        """The router (``gate`` or ``router``, as the original block names it)."""
        return self._modules[self.router_name]

    # the same capacity rule as TopKMoE's, over the same attributes
    capacity = TopKMoE.capacity

    def forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        if self.training:  # multiplicative jitter seen by the router and the experts
            for n in self.input_jitters:
                h = h * torch.empty_like(h).uniform_(1.0 - n, 1.0 + n)
        router = self.hf_router()
        logits, weights, experts = router(h)
        if self.weights_to_hidden:
            weights = weights.to(h.dtype)
        capacity = self.capacity(h.shape[0])
        routing_plan = plan(experts, self.num_experts, capacity)
        implementation = _experts_implementation(self.experts)
        if implementation == "moeyard":
            out = run_experts(self.experts, h, routing_plan, weights)
        elif _expert_parallel(self.experts) is not None:
            raise ValueError(
                f"{self.source}: its experts are sharded over an expert-parallel group "
                "(replace_moe(ep_group=...)), which needs the experts implementation 'moeyard'; "
                f"the model's is {implementation!r} (model.set_experts_implementation('moeyard'))")
        elif capacity is not None:
            raise RuntimeError(
                f"{self.source}: capacity (capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}) needs the experts "
                f"implementation 'moeyard'; the model's is {implementation!r} "
                "(model.set_experts_implementation('moeyard'))")
        else:
            out = self.experts(h, experts.long(), weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(h)
        router.record_load(routing_plan.counts)
        self.last_stats = load_stats(routing_plan)
        report_routing(self, logits=logits, experts=experts, weights=weights, plan=routing_plan)
        out = out.view(shape)
        return (out, weights) if self.returns_weights else out

    def extra_repr(self) -> str:
        text = (f"source={self.source}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}")
        ep = _expert_parallel(self.experts)
        return text if ep is None else f"{text}, {ep.placement}"


def _input_jitters(block: nn.Module, hf_router: nn.Module, routing: _Routing) -> tuple:
    """The multiplicative input jitters (``Uniform(1 - n, 1 + n)`` draws, in order) a block applies
    in training to the tensor both its router and its experts read: Mixtral's ``jitter_noise``;
    PhiMoE's ``input_jitter_noise`` twice (its block multiplies its input in place, then its router
    the same tensor)."""
    noises = [getattr(block, "jitter_noise", 0.0), getattr(block, "input_jitter_noise", 0.0)]
    if routing.router_jitters_input:
        noises.append(getattr(hf_router, "input_jitter_noise", 0.0))
    return tuple(float(n) for n in noises if n and n > 0)


def _sparsemixer_eps(block: nn.Module) -> float:
    """A sparsemixer block's window, ``router_jitter_noise``, from its router (transformers 5.2x)
    or the block itself; NotImplementedError if neither has it."""
    for owner in (getattr(block, _router_name(block), None), block):
        eps = getattr(owner, "router_jitter_noise", None)
        if eps is not None:
            return float(eps)
    raise NotImplementedError(f"replace_moe cannot read the sparsemixer window "
                              f"(router_jitter_noise) of {type(block).__name__} in transformers "
                              f"{transformers.__version__}")


def _router_name(block: nn.Module) -> str:
    return "gate" if hasattr(block, "gate") else "router"


def _router_k(block: nn.Module) -> int:
    """k of a block's router (transformers 5.17's Jamba: a plain nn.Linear, k on the block)."""
    hf_router = getattr(block, _router_name(block), None)
    k = getattr(hf_router, "top_k", None) or getattr(block, "top_k", None)
    if k is None or getattr(hf_router, "weight", None) is None:
        raise NotImplementedError(f"replace_moe cannot read the router of {type(block).__name__} "
                                  f"in transformers {transformers.__version__}")
    return k


def _owned_blocks(model: nn.Module):
    """(qualified name, block) of every MoE block not yet replaced: a module with an ``experts``
    child of transformers' experts kind (decorated by ``use_experts_implementation``)."""
    for qual, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if qual and not isinstance(block, SparseMoeBlock) and hasattr(experts, "has_gate"):
            yield qual, block


def _check_experts_implementation(name: str) -> None:
    if name != "eager" and name not in _hf_moe.ALL_EXPERTS_FUNCTIONS:
        raise ValueError(f"replace_moe: experts_implementation={name!r} is not registered in "
                         f"transformers (registered: eager, "
                         f"{', '.join(_hf_moe.ALL_EXPERTS_FUNCTIONS)})")


def _expert_parallel_for(qual: str, block: nn.Module, ep_group,
                         experts_implementation: Optional[str]) -> ExpertParallel:
    """The exchange that will shard ``block``'s experts over ``ep_group``; ValueError if it
    cannot (another experts implementation, or E not a multiple of the group size)."""
    implementation = experts_implementation or _experts_implementation(block.experts)
    if implementation != "moeyard":
        raise ValueError("replace_moe: expert parallelism (ep_group) runs the experts with "
                         "moeyard's exchange and needs experts_implementation='moeyard', got "
                         f"{implementation!r}")
    try:
        return ExpertParallel(_expert_params(block.experts)[0].shape[0], ep_group)
    except ValueError as e:
        raise ValueError(f"replace_moe: {qual}: {e}") from None


def replace_moe(model: nn.Module, *, bias_balancing: bool = False,
                capacity_factor: Optional[float] = None,
                eval_capacity_factor: Optional[float] = None,
                min_capacity: int = 4,
                experts_implementation: Optional[str] = "moeyard",
                ep_group=None) -> list[str]:
    """Turn every sparse MoE block of a transformers model into a :class:`SparseMoeBlock`, in
    place; returns the qualified names of the blocks.

    The blocks keep their modules and parameters (the same objects, under the same ``state_dict``
    keys; each block becomes a :class:`SparseMoeBlock` and its router an :class:`HFRouter`, both
    still instances of their transformers classes) and, by default, route
    as the originals (softmax or sigmoid, renormalization, group limits,
    ``e_score_correction_bias``, scaling, router bias, PhiMoE's sparsemixer with its training-time
    sampling and gradient estimator; exact ties aside, see :class:`HFRouter`), with
    :func:`moeyard.route` (:func:`moeyard.sparsemixer`) and :func:`moeyard.plan`. Router logits
    are still recorded for ``output_router_logits`` (so the model's aux loss is unchanged), and
    transformers still initialises the routers (``init_weights()``, missing keys).

    Options:
        experts_implementation: the experts implementation the model is switched to (as
            ``model.set_experts_implementation``; it stays switchable afterwards). Default
            ``"moeyard"`` (:func:`moeyard.expert_ffn` on moeyard's plan); None keeps the model's.
        bias_balancing: auxiliary-loss-free balancing: each router gets a trainable selection bias
            ``e_score_correction_bias`` (DeepSeek-V3 style models already have one; others get
            zeros, a new ``state_dict`` key; PhiMoE's sparsemixer has none: ValueError) and
            counts its load; call
            ``moeyard.BiasBalancer(model).step()`` after each optimizer step. Default False.
        capacity_factor, eval_capacity_factor, min_capacity: per-expert capacity in training / in
            eval, as :class:`moeyard.TopKMoE`; over-capacity assignments are dropped by position
            (needs the ``"moeyard"`` experts implementation). Default None: dropless, as
            transformers.
        ep_group: expert parallelism (:mod:`moeyard.distributed`) over this process group (or
            1-D ``DeviceMesh``; torch.distributed must be initialised). Default None: none.
            See below.

    Expert parallelism: build or load the same full model on every rank, then call
    ``replace_moe(model, ep_group=g)`` on every rank. Each block's experts module keeps only this
    rank's ``E_l = E / P`` experts, in contiguous blocks (expert e on rank ``e // E_l``): its
    stacked parameters become new parameters holding copies of those rows, under the same names
    (the full ones are freed once nothing else holds them: create optimizers afterwards). Routers
    and shared experts stay replicated. Each block's forward is then collective: the routed rows
    go to the ranks that hold their experts (:class:`moeyard.distributed.ExpertParallel`), run
    there as one :func:`moeyard.expert_ffn` and come back; each rank's outputs equal the unsharded model's on its own tokens. Dropless
    (the default) costs one host synchronization per block forward; with a capacity factor the
    exchange has static shapes and no host synchronization (every rank must then have the same
    number of tokens). It needs the ``"moeyard"`` experts implementation (ValueError here, or at
    the forward if the model is switched to another). E must be a multiple of P (ValueError).

    ``model.state_dict()`` then holds each rank's slice under the usual keys (``[E_l, ...]``
    instead of ``[E, ...]``); :func:`moeyard.distributed.full_state_dict` (collective) gathers
    the full state dict, which loads into the unsharded model (one rank can save it:
    ``model.save_pretrained(path, state_dict=full)``), and
    :func:`moeyard.distributed.load_full_state_dict` loads a full one, each rank keeping its
    slice. Training: call :func:`moeyard.distributed.sync_gradients` after the backward (or leave
    :func:`moeyard.distributed.expert_parameters` out of DDP).

    Supported blocks: :data:`SUPPORTED_BLOCKS`. A model with any other MoE block, or experts
    moeyard cannot run, raises NotImplementedError before anything is changed; a model with none
    raises ValueError.
    """
    found = list(_owned_blocks(model))
    unsupported = sorted({type(b).__name__ for _, b in found
                          if type(b).__name__ not in SUPPORTED_BLOCKS})
    if unsupported:
        raise NotImplementedError(
            f"replace_moe cannot reproduce {', '.join(unsupported)} (supported: "
            f"{', '.join(SUPPORTED_BLOCKS)}); model.set_experts_implementation('moeyard') runs the "
            "experts of any model on moeyard and keeps its own routing")
    if not found:
        raise ValueError(f"replace_moe: {type(model).__name__} has no sparse MoE block")
    if experts_implementation is not None:
        _check_experts_implementation(experts_implementation)
    for _, block in found:  # every refusal before anything changes
        _router_k(block)
        experts_activation(block.experts)
        if SUPPORTED_BLOCKS[type(block).__name__].score != "sparsemixer":
            continue
        _sparsemixer_eps(block)
        if bias_balancing:
            raise ValueError(f"replace_moe: bias_balancing cannot apply to {type(block).__name__}: "
                             "its sparsemixer routing has no selection bias")
    eps = [None if ep_group is None else
           _expert_parallel_for(qual, block, ep_group, experts_implementation)
           for qual, block in found]
    for (_, block), ep in zip(found, eps):
        SparseMoeBlock.adopt(block, SUPPORTED_BLOCKS[type(block).__name__],
                             bias_balancing=bias_balancing, capacity_factor=capacity_factor,
                             eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity)
        if experts_implementation is not None:
            block.experts.config._experts_implementation = experts_implementation
        if ep is not None:
            shard_parameters(block.experts, ep)
    return [qual for qual, _ in found]
