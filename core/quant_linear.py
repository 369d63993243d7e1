"""QuantLinear: a linear layer whose weight is stored packed (by a BlockwiseQuantizer) in buffers
and dequantized on the fly; backward recomputes the weight instead of keeping it alive.

The two products of a linear layer, ``x @ W.T`` (forward) and ``g @ W`` (the input gradient), take
one of three paths (:func:`product_path`; ``QLORA_PLUGINS_MATMUL=fused|tiles|whole`` forces one):

* ``fused``: fp32 compute on CPU, a format that exposes its lookup-table form
  (:meth:`BlockwiseQuantizer.lut_form`, every builtin format) and the C kernels built: each
  thread decodes a tile of W (about 1 MiB, in its L2 cache) and multiplies it at once with torch's
  BLAS (:func:`qlora_plugins.core.kernels.matmul_4bit_lut`). W never exists in full.
* ``tiles``: fp32 compute on CPU for a format that can decode a range of blocks
  (:meth:`BlockwiseQuantizer.decode_block_range`) but has no lookup-table form (third-party
  formats), and any dtype when forced: a Python loop decodes a block of rows into a small reused
  buffer and multiplies it into the matching output columns (forward) or adds its product (input
  gradient). 16-bit compute takes ``whole`` by default (measured faster).
* ``whole``: the format offers only whole-tensor decode (or the tensors are on a GPU): W is
  decoded into a reusable workspace (one buffer per thread, device and dtype, as large as the
  largest layer) when ``decode_blocks`` accepts ``out=``, into fresh memory otherwise; the
  workspace remembers which weight it holds, so under gradient checkpointing the last layer
  recomputed in forward is not decoded again for backward.
"""

from __future__ import annotations

import inspect
import os
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
        return (
            layer_ref() is layer
            and len(refs) == len(tensors)
            and all(r() is t for r, t in zip(refs, tensors))
            and versions == tuple(t._version for t in tensors)
        )


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
    """Free this thread's dequantization workspaces and tile buffers (allocated again when needed)."""
    _local.__dict__.pop("spaces", None)
    _local.__dict__.pop("tiles", None)


#: Bytes of one weight tile on the ``tiles`` path (in the compute dtype).
TILE_BYTES = 4 << 20
_has_range: dict[type, bool] = {}


def _supports_block_range(quantizer: BlockwiseQuantizer) -> bool:
    cls = type(quantizer)
    if cls not in _has_range:
        _has_range[cls] = cls.decode_block_range is not BlockwiseQuantizer.decode_block_range
    return _has_range[cls]


def product_path(layer: "QuantLinear", dtype: "torch.dtype", device: "torch.device", rows: int = 0, transpose: bool = True) -> str:
    """Which path computes ``layer``'s product (forward ``transpose=True`` or input gradient) of
    ``rows`` input rows in ``dtype`` on ``device``: ``fused``, ``tiles`` or ``whole`` (module
    docstring; on CUDA ``fused`` is Triton's kernel for a forward of at most
    ``kernels.FUSED_GPU_MAX_ROWS`` rows). ``QLORA_PLUGINS_MATMUL`` forces a path where it applies
    (a forced ``fused`` falls back to ``tiles`` and ``tiles`` to ``whole`` where they cannot run)."""
    from qlora_plugins.core import kernels

    forced = os.environ.get("QLORA_PLUGINS_MATMUL", "").strip().lower()
    quantizer = layer.quantizer
    if forced == "whole":
        return "whole"
    lut = type(quantizer).lut_form is not BlockwiseQuantizer.lut_form
    if device.type != "cpu":
        small = transpose and 0 < rows <= kernels.FUSED_GPU_MAX_ROWS
        return "fused" if lut and small and forced != "tiles" and kernels.cuda_backend() == "triton" else "whole"
    if forced != "tiles" and lut and dtype == torch.float32 and kernels.fused_matmul_available(device):
        return "fused"
    # 16-bit compute decodes the whole weight unless asked: torch's bf16 matmul on the whole weight
    # measured 3.5-4.2x faster than the tile loop (one layer's forward and backward, 128 rows)
    if _supports_block_range(quantizer) and (forced == "tiles" or dtype == torch.float32):
        return "tiles"
    return "whole"


_compiled: dict[type, object] = {}


def _decoder(quantizer: BlockwiseQuantizer, device: "torch.device"):
    """``quantizer.decode_blocks``, or on CUDA, for a format without a lookup-table form (whose
    decode is plain torch code), the same method compiled by ``torch.compile`` (Triton fuses its
    elementwise ops into one kernel). Falls back to the plain method, for good, if compiling or
    running the compiled code fails; ``QLORA_PLUGINS_COMPILE_DECODE=0`` turns it off."""
    plain = quantizer.decode_blocks
    cls = type(quantizer)
    if (
        device.type != "cuda"
        or cls.lut_form is not BlockwiseQuantizer.lut_form
        or os.environ.get("QLORA_PLUGINS_COMPILE_DECODE", "1").strip() in ("0", "false", "no")
    ):
        return plain
    from qlora_plugins.core.kernels import triton_kernels

    if triton_kernels.triton is None:
        return plain
    if cls not in _compiled:
        try:
            _compiled[cls] = torch.compile(cls.decode_blocks, dynamic=True)
        except Exception:  # noqa: BLE001 - no compiler support: plain decode
            _compiled[cls] = None
    compiled = _compiled[cls]
    if compiled is None:
        return plain

    def decode(*args, **kwargs):
        try:
            return compiled(quantizer, *args, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. a graph torch.compile cannot handle
            _compiled[cls] = None
            return plain(*args, **kwargs)

    return decode


def _tile_buffer(numel: int, dtype: "torch.dtype", device: "torch.device") -> "torch.Tensor":
    tiles = _local.__dict__.setdefault("tiles", {})
    buf = tiles.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = tiles[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _product(layer: "QuantLinear", a: "torch.Tensor", transpose: bool) -> "torch.Tensor":
    """``a @ W.T`` (``transpose``) or ``a @ W`` for ``layer``'s weight W, by :func:`product_path`."""
    quantizer = layer.quantizer
    rows, cols = layer.out_features, layer.in_features
    state = layer.state()
    device = next(iter(state.values())).device
    path = product_path(layer, a.dtype, device, a.numel() // max(1, a.shape[-1]), transpose)
    if path == "whole":
        weight = layer.dequantize_transient(a.dtype)
        return a @ weight.t() if transpose else a @ weight
    from qlora_plugins.core import kernels

    flat = quantizer.decoded_scales(state)
    blocksize = quantizer.options.blocksize
    if path == "fused":
        lut = quantizer.lut_form(flat)
        return kernels.matmul_4bit_lut(
            a, lut["packed"], lut["absmax"], lut["code"], blocksize, (rows, cols), offset=lut.get("offset"), transpose=transpose
        )
    n = rows * cols
    step = kernels.tile_rows_for(rows, cols, blocksize, TILE_BYTES * 4 // a.element_size())
    buf = _tile_buffer(min(step, rows) * cols, a.dtype, device)
    a2 = a.reshape(-1, a.shape[-1])
    # the input gradient sums one product per tile: in fp32, rounded once at the end (as a single
    # 16-bit matmul accumulates), not once per tile
    acc = a.dtype if transpose else torch.float32
    if acc != a.dtype:
        a2 = a2.to(acc)
    out = torch.empty(a2.shape[0], rows if transpose else cols, dtype=acc, device=a.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        count = (r1 - r0) * cols
        first, stop = r0 * cols // blocksize, -(-min(r1 * cols, n) // blocksize)
        tile = quantizer.decode_block_range(flat, first, stop, n, blocksize, a.dtype, out=buf[:count])
        tile = tile.reshape(r1 - r0, cols).to(acc)
        if transpose:
            torch.mm(a2, tile.t(), out=out[:, r0:r1])
        elif r0 == 0:
            torch.mm(a2[:, r0:r1], tile, out=out)
        else:
            out.addmm_(a2[:, r0:r1], tile)
    return out.to(a.dtype).view(*a.shape[:-1], out.shape[-1])


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T with W decoded in forward and again in backward (never stored; by tiles where
    the format allows)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return _product(layer, x, transpose=True)

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = _product(ctx.layer, grad_output.contiguous(), transpose=False)
        return grad_input, None


class QuantLinear(nn.Module):
    """A linear layer whose weight lives packed in buffers, dequantized on the fly.

    :param quantizer: the :class:`BlockwiseQuantizer` that encoded (and decodes) the weight.
    :param state: the packed tensors (registered as persistent buffers, so ``state_dict`` and
        ``.to(device)`` carry them).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quantizer: BlockwiseQuantizer,
        state: dict,
        bias: "torch.Tensor | None",
        compute_dtype: "torch.dtype",
        layer_name: str = "",
    ) -> None:
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
        state = self.state()
        device = next(iter(state.values())).device
        if device.type == "cuda" and type(self.quantizer).decode is BlockwiseQuantizer.decode:
            numel = self.in_features * self.out_features
            flat = self.quantizer.decoded_scales(state)
            decode = _decoder(self.quantizer, device)
            return decode(flat, numel, self.quantizer.options.blocksize, dtype or self.compute_dtype).reshape(self.weight_shape)
        return self.quantizer.decode(state, self.weight_shape, dtype or self.compute_dtype)

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
        flat = quantizer.decoded_scales(state)
        weight = _decoder(quantizer, device)(flat, numel, quantizer.options.blocksize, dtype, out=out).view(self.weight_shape)
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.quantizer.name}, "
            f"blocksize={self.quantizer.options.blocksize}, double_quant={self.quantizer.options.double_quant}"
        )
