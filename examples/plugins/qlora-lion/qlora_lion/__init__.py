"""A third-party optimizer plugin for qlora-plugins: Lion (Chen et al., 2023, "Symbolic Discovery
of Optimization Algorithms"). Use it with ``optimizer: {name: lion, lr: 3e-4}``."""

from __future__ import annotations

import attrs
import torch

from qlora_plugins import Optimizer, OptimizerOptions, hookimpl
from qlora_plugins.options import in_range


@attrs.define
class LionOptions(OptimizerOptions):
    """Lion's options: the usual ones with Lion's default betas, plus nothing else."""

    lr: float = attrs.field(default=1e-4, validator=in_range(0.0, 1.0))
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.99])


class LionOptimizer(torch.optim.Optimizer):
    """sign(beta1*m + (1-beta1)*g) updates with decoupled weight decay; one state tensor."""

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class Lion(Optimizer):
    """Lion: sign-momentum optimizer with a single state tensor (half of AdamW's state memory)."""

    name = "lion"
    Options = LionOptions

    def create(self, params, device):
        o = self.options
        return LionOptimizer(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@hookimpl
def register_optimizers(register):
    register(Lion)
