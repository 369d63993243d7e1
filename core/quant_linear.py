"""QuantLinear: a linear layer whose weight is stored packed (by a BlockwiseQuantizer) in buffers
and dequantized on the fly; backward recomputes the weight instead of keeping it alive, so memory
stays at the packed size plus one transient layer.

The transient weight of forward and backward is written into a reusable workspace (one buffer per
thread, device and dtype, as large as the largest layer) when the format's ``decode_blocks``
accepts ``out=``: writing into memory that is already mapped is about twice as fast as a fresh
allocation (no page faults), and it stops the allocator from fragmenting the heap with a
layer-sized allocation per call. Formats without ``out=`` dequantize into fresh memory.
"""

from __future__ import annotations

import inspect
import threading
import weakref

import torch
from torch import nn

from qlora_plugins.core.quantized import BlockwiseQuantizer

_local = threading.local()
_accepts_out: dict[type, bool] = {}


def _supports_workspace(quantizer: BlockwiseQuantizer) -> bool:
    """Whether ``quantizer`` can decode into a given buffer: its ``decode_blocks`` takes ``out``
    and it does not override :meth:`BlockwiseQuantizer.decode` (whose steps we repeat)."""
    cls = type(quantizer)
    if cls not in _accepts_out:
        try:
            params = inspect.signature(cls.decode_blocks).parameters
        except (TypeError, ValueError):  # pragma: no cover - exotic callables
            params = {}
        _accepts_out[cls] = "out" in params and cls.decode is BlockwiseQuantizer.decode
    return _accepts_out[cls]


class _Workspace:
    """A buffer and the identity of the weight last written into it."""

    def __init__(self, numel: int, dtype: "torch.dtype", device: "torch.device") -> None:
        self.buffer = torch.empty(numel, dtype=dtype, device=device)
        self.holds: tuple | None = None  # weak references to the layer and its packed tensors, versions

    @staticmethod
    def identity(layer: "QuantLinear", state: dict) -> tuple:
        return (weakref.ref(layer), tuple(weakref.ref(t) for t in state.values()), tuple(t._version for t in state.values()))

    def holds_weight_of(self, layer: "QuantLinear", state: dict) -> bool:
        """Whether the buffer holds ``layer``'s weight decoded from exactly these packed tensors."""
        if self.holds is None:
            return False
        layer_ref, refs, versions = self.holds
        tensors = list(state.values())
        return (layer_ref() is layer and len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors))
                and versions == tuple(t._version for t in tensors))


def _workspace(numel: int, dtype: "torch.dtype", device: "torch.device") -> _Workspace:
    """This thread's workspace of at least ``numel`` elements for ``(device, dtype)``."""
    spaces = _local.__dict__.setdefault("spaces", {})
    key = (device, dtype)
    space = spaces.get(key)
    if space is None or space.buffer.numel() < numel:
        spaces[key] = None  # release the smaller one first
        space = spaces[key] = _Workspace(numel, dtype, device)
    return space


def release_dequant_workspaces() -> None:
    """Free this thread's dequantization workspaces (they are allocated again when needed)."""
    _local.__dict__.pop("spaces", None)


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        weight = layer.dequantize_transient(x.dtype)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantize_transient(grad_output.dtype)
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

    def dequantize_transient(self, dtype: "torch.dtype") -> "torch.Tensor":
        """The weight in ``dtype``, written into the shared workspace when the format allows it:
        valid only until the next dequantization on this thread (the matmuls use it at once).

        When the workspace still holds this very weight (same layer, packed tensors unchanged,
        same dtype) it is returned without decoding again: under gradient checkpointing the last
        layer recomputed in forward is the first one backward needs."""
        quantizer = self.quantizer
        if not _supports_workspace(quantizer):
            return self.dequantize(dtype)
        state = self.state()
        numel = self.in_features * self.out_features
        device = next(iter(state.values())).device
        space = _workspace(numel, dtype, device)
        out = space.buffer[:numel]
        if space.holds_weight_of(self, state):
            return out.view(self.weight_shape)
        space.holds = None
        flat = dict(state)
        for key in quantizer.scale_keys:  # the scale decoding of BlockwiseQuantizer.decode
            prefix = f"{key}_dq_"
            sub = {k[len(prefix):]: flat.pop(k) for k in list(flat) if k.startswith(prefix)}
            if sub:
                flat[key] = quantizer.scale_quantizer.decode(sub)
        weight = quantizer.decode_blocks(flat, numel, quantizer.options.blocksize, dtype, out=out).view(self.weight_shape)
        space.holds = _Workspace.identity(self, state)
        return weight

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
