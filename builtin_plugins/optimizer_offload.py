"""Builtin optimizer ``offload_adamw``: AdamW whose states (and an fp32 master copy of each
parameter) live in host memory, where the update runs.

Each step copies the gradients to pinned host buffers, runs torch's own AdamW math on the host
copies (``torch.optim.AdamW`` over the host tensors), and copies the updated parameters back to
the device. On CUDA this keeps ``8`` bytes per trainable parameter of
optimizer state (plus the host copies) off the device; on a CPU-only machine the device *is* the
host, so the states are simply ordinary memory and the update is the same math, with no copies.
"""

from __future__ import annotations

import functools
from typing import Any

from qlora_plugins import Optimizer, hookimpl
from qlora_plugins.planning import StateBytes


def _adamw_kwargs(options: Any) -> dict:
    return {"lr": options.lr, "weight_decay": options.weight_decay, "betas": tuple(options.betas), "eps": options.eps}


@functools.lru_cache(maxsize=None)
def host_adamw_class() -> type:
    """The torch optimizer class (built on first use, so that registering the plugin does not
    import torch)."""
    import torch

    class HostAdamW(torch.optim.Optimizer):
        """AdamW whose states and fp32 master weights live on the host, where it steps.

        The math is torch's own ``AdamW`` running over host tensors; the parameters it updates are
        copied back to the device. A CPU fp32 parameter is its own host copy (no copies at all).
        ``state_dict`` has torch's usual layout (``state`` by parameter index, ``param_groups``).
        """

        def __init__(
            self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
        ) -> None:
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
            host_groups = []
            for group in self.param_groups:
                host_groups.append({**self._hyper(group), "params": [self._host_copy(p) for p in group["params"]]})
            self.host_optimizer = torch.optim.AdamW(host_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

        @staticmethod
        def _hyper(group: dict) -> dict:
            return {k: v for k, v in group.items() if k != "params"}

        @staticmethod
        def _host_copy(p: "torch.Tensor") -> "torch.Tensor":
            if p.device.type == "cpu" and p.dtype == torch.float32:
                return p.detach()  # shares storage: the update lands in the parameter itself
            pin = p.device.type == "cuda"
            host = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
            return host.copy_(p.detach())

        def _pairs(self):
            for group, host_group in zip(self.param_groups, self.host_optimizer.param_groups):
                host_group.update(self._hyper(group))  # schedulers change our groups: mirror them
                for p, host in zip(group["params"], host_group["params"]):
                    yield p, host

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            copied = False
            for p, host in self._pairs():
                if p.grad is None:
                    host.grad = None
                elif host.data_ptr() == p.data_ptr():
                    host.grad = p.grad
                else:
                    if host.grad is None:
                        host.grad = torch.empty_like(host, pin_memory=host.is_pinned())
                    host.grad.copy_(p.grad, non_blocking=True)
                    copied = True
            if copied and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.host_optimizer.step()
            for p, host in self._pairs():
                if p.grad is not None and host.data_ptr() != p.data_ptr():
                    p.copy_(host, non_blocking=True)
            return loss

        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none=set_to_none)
            self.host_optimizer.zero_grad(set_to_none=set_to_none)

        def state_dict(self) -> dict:
            for _ in self._pairs():
                pass
            return self.host_optimizer.state_dict()

        def load_state_dict(self, state_dict: dict) -> None:
            self.host_optimizer.load_state_dict(state_dict)
            for group, saved in zip(self.param_groups, state_dict["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            with torch.no_grad():  # the host copies follow the (restored) parameters
                for p, host in self._pairs():
                    if host.data_ptr() != p.data_ptr():
                        host.copy_(p.detach())

    return HostAdamW


class OffloadAdamW(Optimizer):
    """AdamW with states (and an fp32 copy of the weights) in host memory; steps on the host."""

    name = "offload_adamw"

    def create(self, params, device):
        return host_adamw_class()(params, **_adamw_kwargs(self.options))

    def runtime_note(self, device):
        if getattr(device, "type", str(device)) != "cuda":
            return "offload_adamw: the device is the CPU, so the states are in host memory anyway; the update is AdamW"
        return None

    def planned_state_bytes(self, trainable: int, device: str) -> StateBytes:
        """Two fp32 states per parameter on the host, plus fp32 host copies of the gradients
        and (on CUDA) of the parameters; on a CPU an fp32 parameter is its own copy."""
        states = trainable * 8.0
        if device == "cpu":
            return StateBytes(host_bytes=states + trainable * 4)
        return StateBytes(host_bytes=states + trainable * 4 * 2, note="on the host; steps there")


@hookimpl
def register_optimizers(register):
    register(OffloadAdamW)
