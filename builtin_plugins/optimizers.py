"""Builtin optimizers: ``paged_adamw`` and ``adamw_8bit`` (bitsandbytes), ``adamw`` (torch)."""

from __future__ import annotations

from typing import Any

from qlora_plugins import Optimizer, hookimpl
from qlora_plugins.planning import StateBytes


def _kwargs(options: Any) -> dict:
    return {"lr": options.lr, "weight_decay": options.weight_decay, "betas": tuple(options.betas), "eps": options.eps}


class AdamW(Optimizer):
    """torch.optim.AdamW (fp32 states on the model's device)."""

    name = "adamw"
    shardable = True

    def create(self, params, device):
        import torch

        return torch.optim.AdamW(params, **_kwargs(self.options))

    def planned_state_bytes(self, trainable: int, device: str) -> StateBytes:
        """Two fp32 states per parameter, on the device."""
        return StateBytes(device_bytes=trainable * 8.0)


class PagedAdamW(Optimizer):
    """bitsandbytes PagedAdamW: states in CUDA unified memory, paged to host RAM under pressure."""

    name = "paged_adamw"
    default = True  # what a config without an optimizer section gets

    def create(self, params, device):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, **_kwargs(self.options))

    def runtime_note(self, device):
        if getattr(device, "type", str(device)) != "cuda":
            return "paged_adamw: no CUDA device, so states are ordinary host memory (paging is CUDA-only); the update is AdamW"
        return None

    def planned_state_bytes(self, trainable: int, device: str) -> StateBytes:
        """Two fp32 states per parameter in CUDA unified memory: on the device until it pages
        to the host."""
        return StateBytes(device_bytes=trainable * 8.0, pageable=True, note="paged: moves to the host under pressure")


class AdamW8bit(Optimizer):
    """bitsandbytes AdamW8bit: blockwise 8-bit optimizer states."""

    name = "adamw_8bit"

    def create(self, params, device):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **_kwargs(self.options))

    def planned_state_bytes(self, trainable: int, device: str) -> StateBytes:
        """Two uint8 states per parameter plus an fp32 absmax per 256, on the device."""
        return StateBytes(device_bytes=trainable * (2.0 + 8.0 / 256))


@hookimpl
def register_optimizers(register):
    register(AdamW)
    register(PagedAdamW)
    register(AdamW8bit)
