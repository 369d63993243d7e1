"""``model.frozen_dtype``: frozen weights that are not quantized (embeddings, output head, any
unquantized linear layer) stored in 16 bits while the model computes in ``model.dtype``.

* ``nn.Embedding``: the lookup reads the 16-bit table and its output is converted to the compute
  dtype (exactly the fp32 lookup of the rounded table).
* ``nn.Linear``: a custom autograd function multiplies by the 16-bit weight converted to the
  compute dtype a tile of rows at a time (the full-precision copy never exists, and backward keeps
  only a reference to the 16-bit weight).

Norms, biases and other small tensors stay in the compute dtype (a fraction of a percent of the
bytes). The only numerical change is the rounding of those weights to 16 bits (bf16 keeps fp32's
range with an 8-bit mantissa: relative error <= 2^-9 per weight); ``qlora quant-report
--frozen-dtype`` measures its effect on a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Bytes of the compute-dtype copy of one weight tile in :class:`_Frozen16Linear`.
TILE_BYTES = 4 << 20


def frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Embedding and (unquantized) Linear modules whose weight can be kept in 16 bits."""
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Embedding, nn.Linear)}


def prepare_skeleton(model: nn.Module, dtype: torch.dtype, skip: set[str]) -> None:
    """Give the frozen modules' weights of a not yet loaded skeleton 16-bit storage (the loader
    then converts the checkpoint's tensors into it); ``skip``: module names about to be quantized."""
    for name, module in frozen_modules(model).items():
        if name not in skip and module.weight.is_floating_point() and module.weight.dtype != dtype:
            module.weight.data = torch.empty(module.weight.shape, dtype=dtype, device=module.weight.device)


class _Frozen16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, compute_dtype):
        ctx.weight = weight
        rows = weight.shape[0]
        step = max(1, TILE_BYTES // (weight.shape[1] * x.element_size()))
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
        for r0 in range(0, rows, step):
            torch.mm(x2, weight[r0 : r0 + step].to(compute_dtype).t(), out=out[:, r0 : r0 + step])
        return out.view(*x.shape[:-1], rows)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weight
        rows = weight.shape[0]
        step = max(1, TILE_BYTES // (weight.shape[1] * grad.element_size()))
        g2 = grad.reshape(-1, rows)
        out = torch.zeros(g2.shape[0], weight.shape[1], dtype=grad.dtype, device=grad.device)
        for r0 in range(0, rows, step):
            out.addmm_(g2[:, r0 : r0 + step], weight[r0 : r0 + step].to(grad.dtype))
        return out.view(*grad.shape[:-1], weight.shape[1]), None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    compute = self._qlora_compute_dtype
    dtype = x.dtype
    out = _Frozen16Linear.apply(x.to(compute), self.weight, compute)
    if self.bias is not None:
        out = out + self.bias.to(compute)
    return out.to(dtype)


def _embedding_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.to(module._qlora_compute_dtype)


def keep_frozen_16bit(model: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype) -> list[str]:
    """Store the frozen Embedding/Linear weights of ``model`` in ``dtype`` (16-bit) and make
    their modules compute in ``compute_dtype``. Idempotent; returns the names of the modules.

    :raises ValueError: a weight that is trainable (the option is for frozen weights only).
    """
    done = []
    for name, module in frozen_modules(model).items():
        weight = module.weight
        if not weight.is_floating_point() or getattr(module, "_qlora_compute_dtype", None) is not None:
            if getattr(module, "_qlora_compute_dtype", None) is not None:
                done.append(name)
            continue
        if weight.requires_grad:
            raise ValueError(f"{name}.weight is trainable; model.frozen_dtype only applies to frozen weights")
        if weight.dtype != dtype:
            weight.data = weight.data.to(dtype)
        module._qlora_compute_dtype = compute_dtype
        if isinstance(module, nn.Linear):
            module.forward = _linear_forward.__get__(module)
        else:
            module.register_forward_hook(_embedding_output)
        done.append(name)
    return done
