"""Training-time helpers: summing the MoE layers' aux losses, and the auxiliary-loss-free bias
controller (Loss-Free Balancing / DeepSeek-V3)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ops import update_expert_bias
from .routers import TopKRouter

__all__ = ["collect_aux_losses", "BiasBalancer"]


def collect_aux_losses(model: nn.Module) -> Tensor:
    """Sum of every MoE layer's ``aux_losses`` (already multiplied by their coefficients) from its
    last forward: add it to the main loss, ``loss = task_loss + moeyard.collect_aux_losses(model)``.
    A 0-dim tensor (0.0 when no layer has an aux loss)."""
    total = None
    for m in model.modules():
        for loss in getattr(m, "aux_losses", {}).values():
            total = loss if total is None else total + loss
    return torch.zeros(()) if total is None else total


class BiasBalancer:
    """Auxiliary-loss-free balancing controller: call :meth:`step` after each optimizer step.

    For every :class:`TopKRouter` in ``model`` that balances by bias, ``step`` reads the load its
    training forwards accumulated since the last step (``load_since_update``: the routers count,
    this class accumulates nothing), sums it over the data-parallel ``process_group`` (default:
    the world) when ``torch.distributed`` is initialized, applies
    ``bias += rate * sign(mean(load) - load)`` (:func:`moeyard.update_expert_bias`) and zeroes
    the load. ``rate`` (default 1e-3, DeepSeek-V3's bias update speed) is an attribute: set it to
    0 to freeze the biases (as DeepSeek-V3 does for its last tokens).
    """

    def __init__(self, model: nn.Module, rate: float = 1e-3, process_group=None):
        self.routers = [m for m in model.modules()
                        if isinstance(m, TopKRouter) and m.e_score_correction_bias is not None]
        if not self.routers:
            raise ValueError("BiasBalancer: the model has no router with bias_balancing=True")
        self.rate = rate
        self.process_group = process_group

    @torch.no_grad()
    def step(self) -> None:
        loads = torch.cat([r.load_since_update for r in self.routers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads, group=self.process_group)  # one collective for all layers
        sizes = [r.num_experts for r in self.routers]
        for router, load in zip(self.routers, loads.split(sizes)):
            update_expert_bias(router.e_score_correction_bias, load, self.rate)
            router.load_since_update.zero_()
