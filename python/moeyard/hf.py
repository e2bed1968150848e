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
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .ops import expert_ffn, plan
from .reference import OSS_ALPHA, OSS_LIMIT

try:
    import transformers
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("moeyard.hf needs transformers: pip install 'moeyard[hf]' (or "
                      "transformers, see SUPPORTED_TRANSFORMERS in moeyard/hf.py)") from e

from packaging.version import Version

__all__ = ["SUPPORTED_TRANSFORMERS", "experts_forward", "experts_activation", "run_experts"]

#: transformers versions this integration is tested with: ``[low, high)``. The CPU tests run on
#: the version pinned in the Makefile (the newest), the GPU tests on the GPU machine's (5.17).
SUPPORTED_TRANSFORMERS = ("5.17", "5.24")

_ALLOW_ENV = "MOEYARD_HF_ALLOW_UNTESTED"


def _check_version(version: str) -> None:
    low, high = (Version(v) for v in SUPPORTED_TRANSFORMERS)
    if low <= Version(version) < Version(high.base_version):
        return
    msg = (f"moeyard.hf supports transformers >={low},<{high}; {version} is installed. The "
           "integration reads transformers' MoE modules and registries, which change between "
           f"releases; install a supported version (pip install 'transformers>={low},<{high}').")
    if os.environ.get(_ALLOW_ENV) != "1":
        raise ImportError(msg + f" To try it anyway, set {_ALLOW_ENV}=1 (and run moeyard's "
                          "tests/test_hf.py on it).")
    warnings.warn(msg + f" Going on because {_ALLOW_ENV}=1: results are unverified.",
                  stacklevel=3)


_check_version(transformers.__version__)

from transformers.integrations import moe as _hf_moe  # noqa: E402


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
    ``top_k_index [T, k]`` (expert ids; with expert parallelism ids >= num_experts are other
    ranks' and add nothing), ``top_k_weights [T, k]`` -> ``[T, d]``. Registered as
    ``"moeyard"``."""
    num_experts = _expert_params(self)[0].shape[0]
    experts = top_k_index.to(torch.int32)
    if self._is_expert_parallel:
        experts = experts.masked_fill(experts >= num_experts, -1)
    return run_experts(self, hidden_states, plan(experts, num_experts), top_k_weights)


_hf_moe.ExpertsInterface.register("moeyard", experts_forward)
