"""Training-time helpers: summing the MoE layers' aux losses, the auxiliary-loss-free bias
controller (Loss-Free Balancing / DeepSeek-V3) and ReMoE's adaptive L1 coefficient controller."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import ReMoE
from .ops import update_expert_bias
from .routers import TopKRouter

__all__ = ["collect_aux_losses", "BiasBalancer", "ReMoEController"]


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

    ``recenter``: the signs of one update rarely sum to zero (one overloaded expert: E - 1 biases
    go up, one down), so with the paper's rule all biases drift together, by up to ``rate`` per
    step. A common shift never changes which experts a token selects (every selection compares
    ``s + b`` within a token or a group sum of them), so the drift only costs fp32 resolution of
    ``s + b`` after very many steps. ``recenter=True`` subtracts each update's mean over the
    experts (torchtitan's rule), keeping the mean bias where it started; default False: the
    paper's rule (Loss-Free Balancing Algorithm 1, DeepSeek-V3, Megatron).
    """

    def __init__(self, model: nn.Module, rate: float = 1e-3, process_group=None,
                 recenter: bool = False):
        self.routers = [m for m in model.modules()
                        if isinstance(m, TopKRouter) and m.load_since_update is not None]
        if not self.routers:
            raise ValueError("BiasBalancer: the model has no router with bias_balancing=True")
        self.rate, self.recenter = rate, recenter
        self.process_group = process_group

    @torch.no_grad()
    def step(self) -> None:
        loads = torch.cat([r.load_since_update for r in self.routers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads, group=self.process_group)  # one collective for all layers
        sizes = [r.num_experts for r in self.routers]
        for router, load in zip(self.routers, loads.split(sizes)):
            bias = router.e_score_correction_bias
            before = bias.mean() if self.recenter else None
            update_expert_bias(bias, load, self.rate)
            if before is not None:
                bias.sub_(bias.mean() - before)
            router.load_since_update.zero_()


class ReMoEController:
    """ReMoE's adaptive L1 coefficient: call :meth:`step` after each optimizer step.

    ``step`` reads the sparsity (fraction of zero gates) that every :class:`ReMoE` layer's training
    forwards accumulated since the last step, averages it (over the forwards, summed over the
    data-parallel ``process_group`` when ``torch.distributed`` is initialized, then over the
    layers), and applies thu-ml/ReMoE's rule ``lambda *= alpha if S < target else 1 / alpha``
    (``lambda_{i+1} = lambda_i * alpha^sign(target - S_i)``, ``S == target`` divides) with
    ``target = 1 - k/E``, then zeroes the accumulators. As in ReMoE one sparsity, averaged over the
    MoE layers, drives every layer's lambda (they must share the target);
    ``per_layer=True`` updates each layer from its own sparsity and target instead. A layer (or,
    shared, all layers) with no training forward since the last step keeps its lambda.
    ``alpha`` (default 1.2, ReMoE's ``moe_relu_l1_reg_coeff_multiplier``) is an attribute.
    No host synchronization.
    """

    def __init__(self, model: nn.Module, alpha: float = 1.2, per_layer: bool = False,
                 process_group=None):
        self.layers = [m for m in model.modules() if isinstance(m, ReMoE)]
        if not self.layers:
            raise ValueError("ReMoEController: the model has no ReMoE layer")
        if not alpha >= 1:
            raise ValueError(f"alpha={alpha} must be >= 1")
        targets = {m.target_sparsity for m in self.layers}
        if not per_layer and len(targets) > 1:
            raise ValueError(f"ReMoE layers have different target sparsities {sorted(targets)}: "
                             "use per_layer=True")
        self.alpha, self.per_layer, self.process_group = alpha, per_layer, process_group

    @torch.no_grad()
    def step(self) -> None:
        sums = torch.stack([m.sparsity_since_update for m in self.layers])
        counts = torch.stack([m.forwards_since_update for m in self.layers]).float()
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([sums, counts])
            dist.all_reduce(both, group=self.process_group)  # one collective for all layers
            sums, counts = both.split(len(self.layers))
        seen = counts > 0
        sparsity = sums / counts.clamp(min=1)
        if not self.per_layer:
            sparsity = ((sparsity * seen).sum() / seen.sum().clamp(min=1)).expand_as(sums)
            seen = seen.any().expand_as(sums)
        target = torch.tensor([m.target_sparsity for m in self.layers], device=sums.device)
        up = torch.full_like(sums, self.alpha)
        factor = torch.where(sparsity < target, up, 1 / up)
        factor = torch.where(seen, factor, torch.ones_like(factor))
        for m, f in zip(self.layers, factor):
            m.l1_reg_coeff.mul_(f)
            m.sparsity_since_update.zero_()
            m.forwards_since_update.zero_()
