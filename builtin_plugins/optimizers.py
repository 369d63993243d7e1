"""Builtin optimizers: ``paged_adamw`` and ``adamw_8bit`` (bitsandbytes), ``adamw`` (torch)."""

from __future__ import annotations

from typing import Any

from qlora_plugins import Optimizer, hookimpl


def _kwargs(options: Any) -> dict:
    return {"lr": options.lr, "weight_decay": options.weight_decay, "betas": tuple(options.betas), "eps": options.eps}


class AdamW(Optimizer):
    """torch.optim.AdamW (fp32 states on the model's device)."""

    name = "adamw"

    def create(self, params, device):
        import torch

        return torch.optim.AdamW(params, **_kwargs(self.options))


class PagedAdamW(Optimizer):
    """bitsandbytes PagedAdamW: states in CUDA unified memory, paged to host RAM under pressure."""

    name = "paged_adamw"

    def create(self, params, device):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, **_kwargs(self.options))

    def runtime_note(self, device):
        if getattr(device, "type", str(device)) != "cuda":
            return "paged_adamw: no CUDA device, so states are ordinary host memory (paging is CUDA-only); the update is AdamW"
        return None


class AdamW8bit(Optimizer):
    """bitsandbytes AdamW8bit: blockwise 8-bit optimizer states."""

    name = "adamw_8bit"

    def create(self, params, device):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **_kwargs(self.options))


@hookimpl(trylast=True)
def register_optimizers(register):
    register(AdamW)
    register(PagedAdamW)
    register(AdamW8bit)
