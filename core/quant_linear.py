"""QuantLinear: a linear layer whose weight is stored packed (by a BlockwiseQuantizer) in buffers
and dequantized on the fly; backward recomputes the weight instead of keeping it alive, so memory
stays at the packed size plus one transient layer."""

from __future__ import annotations

import torch
from torch import nn

from qlora_plugins.core.quantized import BlockwiseQuantizer


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        weight = layer.dequantize(x.dtype)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantize(grad_output.dtype)
            grad_input = grad_output @ weight
        return grad_input, None


class QuantLinear(nn.Module):
    """A linear layer whose weight lives packed in buffers, dequantized on the fly.

    :param quantizer: the :class:`BlockwiseQuantizer` that encoded (and decodes) the weight.
    :param state: the packed tensors (registered as persistent buffers, so ``state_dict`` and
        ``.to(device)`` carry them).
    """

    def __init__(self, in_features: int, out_features: int, quantizer: BlockwiseQuantizer, state: dict,
                 bias: "torch.Tensor | None", compute_dtype: "torch.dtype", layer_name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantizer, self.compute_dtype, self.layer_name = quantizer, compute_dtype, layer_name
        self._state_keys: list[str] = []
        self._set_state(state)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _set_state(self, state: dict) -> None:
        for key in self._state_keys:
            delattr(self, key)
        self._state_keys = list(state)
        for key, tensor in state.items():
            self.register_buffer(key, tensor, persistent=True)

    def load_state(self, state: dict) -> None:
        """Replace the packed tensors (and bias, if present in ``state``) from a saved state dict."""
        bias = state.pop("bias", None)
        self._set_state(state)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def state(self) -> dict:
        """The packed tensors by name."""
        return {key: getattr(self, key) for key in self._state_keys}

    def dequantize(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """The full weight, ``(out_features, in_features)``, in ``dtype`` (default compute dtype)."""
        return self.quantizer.decode(self.state(), self.weight_shape, dtype or self.compute_dtype)

    def requantize(self, weight: "torch.Tensor") -> None:
        """Replace the stored weight by the quantization of ``weight`` (used by merges)."""
        state = self.quantizer.encode(weight, self.layer_name)
        device = next(iter(self.state().values())).device
        self._set_state({k: v.to(device) for k, v in state.items()})

    def to_linear(self, dtype: "torch.dtype | None" = None) -> "nn.Linear":
        """An ``nn.Linear`` holding the dequantized weight."""
        weight = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.data.to(weight.dtype), requires_grad=False)
        return linear

    @property
    def weight(self) -> "torch.Tensor":
        """The dequantized weight (read-only view for code that inspects ``.weight``)."""
        return self.dequantize()

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        dtype = x.dtype
        x = x.to(self.compute_dtype)
        out = _DequantMatmul.apply(x, self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.quantizer.name}, "
                f"blocksize={self.quantizer.options.blocksize}, double_quant={self.quantizer.options.double_quant}")
