"""Blockwise 4-bit and 8-bit quantization kernels (bitsandbytes-compatible).

Import as ``qlora_plugins.core.kernels``. CPU tensors use C kernels compiled on
first use (see :mod:`.native`); CUDA tensors, and CPU tensors when no compiler
is available or ``QLORA_PLUGINS_NO_NATIVE=1``, use the pure-torch reference
(:mod:`.reference`), which defines the exact results: both backends are
bit-identical.

Blocks
------
A tensor of any shape is flattened to ``n`` elements; block ``b`` holds the
``blocksize`` consecutive elements ``[b*bs, (b+1)*bs)``; ``blocksize`` is a power
of two in [32, 4096]. The last block may be partial: it is handled as if
zero-padded, i.e. its statistics (absmax, min, max) come only from its real
elements. 4-bit codes are packed two per byte, element ``2i`` in the HIGH nibble
(bnb's layout); an odd ``n`` leaves one padding nibble. Inputs are fp32, bf16 or
fp16 (16-bit inputs are converted exactly to fp32 first); every computation is
in fp32 with IEEE rounding and no fused multiply-add.

Lookup-table formats (nf4, fp4; bit-exact with ``bitsandbytes.functional.quantize_4bit``)
----------------------------------------------------------------------------------------
``absmax[b] = max |x|`` over the block. With ``order = argsort(code)`` and the 15
midpoints ``m_j = (code[order[j]] + code[order[j+1]]) / 2`` (fp32)::

    s    = clamp(x * (1 / max(absmax[b], 1e-38)), -1, 1)     # full blocks
    s    = clamp(x / max(absmax[b], 1e-38), -1, 1)           # tail block (bnb divides there)
    code = order[#{j : m_j < s}]                            # ties at a midpoint go down

A tail block's stored absmax is ``max(absmax, 1e-38)`` (as bnb); an all-zero
full block stores 0 and codes ``code-of-0``. The padding nibble of odd ``n`` is
the code of 0.0. Dequantization: ``out = code[q] * absmax[b]`` in fp32 (``+
offset[b]`` if given), rounded once to the output dtype (round-to-nearest-even;
identical to ``tensor.to(dtype)``).

Affine int4
-----------
symmetric::

    scale = absmax / 8                      (absmax = max |x|)
    q     = clamp(round_half_even(x / scale), -8, 7)   (q = 0 if scale == 0)
    stored code = q + 8 in [0, 15];  dequant (code - 8) * scale
          = LUT dequant with table [-8..7] and absmax = scale

Note the clamp at +7: values above 7.5*scale (up to absmax = 8*scale) have an
error of up to one scale instead of half.

asymmetric::

    m = min(x), M = max(x)  (over the block's real elements; -0.0 stored as +0.0)
    scale = (M - m) / 15
    q     = clamp(round_half_even((x - m) / scale), 0, 15)   (q = 0 if scale == 0)
    dequant q * scale + m  = LUT dequant with table [0..15], absmax = scale, offset = m

The offset is stored as the fp32 block minimum rather than an integer zero point,
so that the minimum is reconstructed exactly. The padding nibble is 0.

8-bit blockwise / double quantization (bit-exact with bnb's CPU ``quantize_blockwise``)
---------------------------------------------------------------------------------------
bnb 0.50's CPU kernel normalizes ``v = x * (1/absmax)`` and maps it through a
65536-entry table ``lut[uint16(fma((clamp(v)+1)*0.5, 65535, 0.5))]`` built from the
midpoints of the 256-entry code (:func:`reference.bnb8_lut`); an all-zero block gives
code 0. The C kernel evaluates exactly that; the torch path uses the equivalent
``q = #{j : B[j] <= v}`` with 255 fp32 thresholds ``B`` derived exactly from the table
(the map is monotone; :func:`reference.bnb8_boundaries`).
Dequant ``code256[q] * absmax[b]``. ``double_quantize`` follows
``quantize_4bit(..., compress_statistics=True)``: ``offset = absmax.mean()``,
then 8-bit blockwise quantization (blocksize 256, dynamic map) of ``absmax - offset``.

Performance notes
-----------------
The C kernels use OpenMP over blocks (``torch.get_num_threads()`` threads, one thread
below 2^18 elements; dynamic chunks so a descheduled thread on a busy machine does
not stall the others), AVX2/F16C when the CPU has them, and check for NaN/Inf inside
their single pass. Dequantization of large outputs (>= 8 MiB) asks for transparent
huge pages on the fresh output (first-touch page faults otherwise cost as much as
the kernel) and uses streaming stores; reuse a buffer with ``out=`` to avoid the
page faults altogether. As with torch's own OpenMP kernels, do not call them in a
``fork()``-ed child after the parent used them (libgomp is not fork-safe).

Known divergence: bnb's AVX512-BF16 dequant path flushes bf16 results that are
fp32-denormal (|value| < 1.2e-38) to zero; we round them like ``torch``. bnb's
CPU dequant also indexes absmax per row when the last dim is not a multiple of the
blocksize (a bnb bug); we always use flat blocks, like bnb's quantizer and CUDA.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch

from . import native, reference
from .native import backend_name
from .reference import dynamic_map_8bit, fp4_code, int4_code, nf4_code

__all__ = [
    "backend_name",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "dynamic_map_8bit",
    "quantize_4bit_lut",
    "dequantize_4bit_lut",
    "quantize_4bit_int",
    "dequantize_4bit_int",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "double_quantize",
    "double_dequantize",
    "fused_matmul_available",
    "matmul_4bit_lut",
    "tile_rows_for",
    "TILE_BYTES",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NONFINITE_MSG = "tensor contains NaN or Inf"

ShapeLike = Union[int, Sequence[int], torch.Size]


# --------------------------------------------------------------------------- #
# validation / dispatch helpers
# --------------------------------------------------------------------------- #


def _check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"blocksize must be an int, got {blocksize!r}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    return blocksize


def _check_input(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {x.dtype}; expected float32, bfloat16 or float16")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    return x.contiguous()


def _check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(_NONFINITE_MSG)


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported out_dtype {out_dtype}; expected float32, bfloat16 or float16")


def _numel(shape: ShapeLike) -> tuple[tuple[int, ...], int]:
    shp = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    n = math.prod(shp)
    if n <= 0:
        raise ValueError(f"shape {shp} is empty")
    return shp, n


def _nblocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _native_for(*tensors: torch.Tensor):
    """The C library if every tensor is on the CPU and native kernels are enabled."""
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return native.get_lib()


def cuda_backend() -> str:
    """The kernels CUDA tensors use: ``QLORA_PLUGINS_CUDA_KERNELS`` = ``triton``, ``bitsandbytes``
    (nf4/fp4 dequantization through bitsandbytes' CUDA kernels; the storage is bit-exact with
    theirs) or ``torch`` (the reference); default ``auto``: triton when it is installed, else torch.
    ``benchmarks/gpu_check.sh`` measures triton against bitsandbytes to choose."""
    choice = os.environ.get("QLORA_PLUGINS_CUDA_KERNELS", "auto").strip().lower() or "auto"
    if choice in ("auto", "triton"):
        from . import triton_kernels

        return "triton" if triton_kernels.triton is not None else "torch"
    return choice if choice in ("bitsandbytes", "torch") else "torch"


def _gpu_kernels(t: torch.Tensor):
    """The Triton module for a CUDA tensor when :func:`cuda_backend` says triton, else ``None``."""
    if t.device.type == "cuda" and cuda_backend() == "triton":
        from . import triton_kernels

        return triton_kernels
    return None


def _bnb_dequant(packed, absmax, code, blocksize, shp, out_dtype):
    """nf4/fp4 through bitsandbytes' own kernels, or ``None`` for another table."""
    for quant_type, table in (("nf4", nf4_code), ("fp4", fp4_code)):
        if torch.equal(code.cpu(), table()):
            import bitsandbytes.functional as F

            state = F.QuantState(
                absmax=absmax, shape=torch.Size(shp), code=code, blocksize=blocksize, quant_type=quant_type, dtype=out_dtype
            )
            return F.dequantize_4bit(packed.view(-1, 1), state)
    return None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _code16(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(code, torch.Tensor) or code.numel() != 16:
        raise ValueError("code must be a tensor of 16 values")
    code = code.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    _check_finite(code)
    return code


def _code256(code256: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    if code256 is None:
        return dynamic_map_8bit(device)
    if not isinstance(code256, torch.Tensor) or code256.numel() != 256:
        raise ValueError("code256 must be a tensor of 256 values")
    code256 = code256.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    _check_finite(code256)
    if bool((code256[1:] < code256[:-1]).any()):
        raise ValueError("code256 must be sorted in non-decreasing order")
    return code256


def _check_packed(packed: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError("packed must be a uint8 tensor")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, expected {(n + 1) // 2} for {n} elements")
    return packed.contiguous().reshape(-1)


def _check_stats(t: torch.Tensor, nb: int, name: str, device: torch.device, finite: bool) -> torch.Tensor:
    """Per-block statistics as contiguous fp32; ``finite``: also check for NaN/Inf here
    (the C kernels check inside their pass, avoiding an extra torch reduction)."""
    if not isinstance(t, torch.Tensor) or t.numel() != nb:
        raise ValueError(f"{name} must have {nb} elements (one per block)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    t = t.detach().reshape(-1).to(torch.float32).contiguous()
    if finite:
        _check_finite(t)
    return t


# --------------------------------------------------------------------------- #
# 4-bit lookup-table formats
# --------------------------------------------------------------------------- #


def quantize_4bit_lut(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization with a 16-entry lookup table (nf4, fp4).

    Bit-exact with ``bitsandbytes.functional.quantize_4bit(x, blocksize, quant_type,
    compress_statistics=False)`` on CPU for fp32/bf16/fp16 input (its packed tensor
    is ours ``.view(-1, 1)``).

    Args:
        x: fp32/bf16/fp16 tensor of any shape (flattened; not modified).
        code: the 16 code values, e.g. :func:`nf4_code` or :func:`fp4_code`.
        blocksize: power of two in [32, 4096].

    Returns:
        ``(packed, absmax)``: uint8 ``[ceil(n/2)]`` (high nibble first) and fp32 ``[nblocks]``.

    Raises:
        ValueError: empty tensor, NaN/Inf, unsupported dtype, bad blocksize or code.
    """
    _check_blocksize(blocksize)
    x = _check_input(x)
    code = _code16(code, x.device)
    n = x.numel()
    lib = _native_for(x)
    if lib is None:
        _check_finite(x)
        return reference.quantize_4bit_lut(x, code, blocksize)
    bounds, order = reference.lut_bounds(code)
    bounds = bounds.contiguous()
    order8 = order.to(torch.uint8).contiguous()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(_nblocks(n, blocksize), dtype=torch.float32)
    rc = lib.qp_quantize_4bit_lut(
        x.data_ptr(), _DT_CODE[x.dtype], n, blocksize, bounds.data_ptr(), order8.data_ptr(),
        packed.data_ptr(), absmax.data_ptr(), _threads(),
    )  # fmt: skip
    if rc:
        raise ValueError(_NONFINITE_MSG)
    return packed, absmax


def dequantize_4bit_lut(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: ShapeLike,
    out_dtype: torch.dtype = torch.float32,
    offset: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Inverse of the 4-bit formats: ``out = code[q] * absmax[b] (+ offset[b])``.

    The product (and sum) are fp32, then rounded once (nearest-even) to ``out_dtype``.
    Bit-exact with ``bitsandbytes.functional.dequantize_4bit`` for the same state.

    Args:
        packed: uint8 tensor of ``ceil(n/2)`` bytes (any shape).
        absmax: per-block scale, ``nblocks`` floats (fp32 used).
        code: the 16 code values.
        blocksize: power of two in [32, 4096].
        shape: output shape (``n = prod(shape)``).
        out_dtype: float32, bfloat16 or float16.
        offset: optional per-block additive offset (affine formats).
        out: optional preallocated contiguous tensor (``n`` elements of ``out_dtype`` on
            ``packed``'s device) to write into, e.g. a buffer reused at every forward pass;
            it is returned reshaped to ``shape``.

    Returns:
        Tensor of ``shape`` and ``out_dtype`` on ``packed``'s device.
    """
    _check_blocksize(blocksize)
    _check_out_dtype(out_dtype)
    shp, n = _numel(shape)
    packed = _check_packed(packed, n)
    dev = packed.device
    nb = _nblocks(n, blocksize)
    lib = _native_for(packed)
    absmax = _check_stats(absmax, nb, "absmax", dev, lib is None)
    if offset is not None:
        offset = _check_stats(offset, nb, "offset", dev, lib is None)
    code = _code16(code, dev)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != out_dtype or out.numel() != n or out.device != dev or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {out_dtype} tensor of {n} elements on {dev}")
    if lib is None:
        gpu = _gpu_kernels(packed)
        if gpu is not None:
            return gpu.dequantize_4bit_lut(packed, absmax, code, blocksize, n, out_dtype, offset, out).view(shp)
        if dev.type == "cuda" and offset is None and cuda_backend() == "bitsandbytes":
            res = _bnb_dequant(packed, absmax, code, blocksize, shp, out_dtype)
            if res is not None:
                return res if out is None else out.view(shp).copy_(res)
        res = reference.dequantize_4bit_lut(packed, absmax, code, blocksize, n, out_dtype, offset).view(shp)
        return res if out is None else out.view(shp).copy_(res)
    out = torch.empty(shp, dtype=out_dtype) if out is None else out.view(shp)
    rc = lib.qp_dequantize_4bit_lut(
        packed.data_ptr(), absmax.data_ptr(), offset.data_ptr() if offset is not None else None,
        code.data_ptr(), n, blocksize, out.data_ptr(), _DT_CODE[out_dtype], _threads(),
    )  # fmt: skip
    if rc:
        raise ValueError(_NONFINITE_MSG)
    return out


# --------------------------------------------------------------------------- #
# affine int4
# --------------------------------------------------------------------------- #


def quantize_4bit_int(
    x: torch.Tensor, blocksize: int = 64, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Blockwise affine int4 quantization (formulas in the module docstring).

    Args:
        x: fp32/bf16/fp16 tensor of any shape (flattened; not modified).
        blocksize: power of two in [32, 4096].
        symmetric: ``True``: q in [-8, 7], scale = absmax/8, no offset;
            ``False``: q in [0, 15], scale = (max-min)/15, offset = block min.

    Returns:
        ``(packed, scale, offset)``: uint8 ``[ceil(n/2)]``, fp32 ``[nblocks]``, and fp32
        ``[nblocks]`` (asymmetric) or ``None`` (symmetric).

    Raises:
        ValueError: empty tensor, NaN/Inf, unsupported dtype, bad blocksize, or a
        block whose range ``max - min`` overflows fp32 (asymmetric).
    """
    _check_blocksize(blocksize)
    x = _check_input(x)
    n = x.numel()
    lib = _native_for(x)
    if lib is None:
        _check_finite(x)
        packed, scale, offset = reference.quantize_4bit_int(x, blocksize, bool(symmetric))
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("block value range overflows float32")
        return packed, scale, offset
    nb = _nblocks(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    scale = torch.empty(nb, dtype=torch.float32)
    offset = None if symmetric else torch.empty(nb, dtype=torch.float32)
    rc = lib.qp_quantize_4bit_int(
        x.data_ptr(), _DT_CODE[x.dtype], n, blocksize, int(bool(symmetric)), packed.data_ptr(),
        scale.data_ptr(), offset.data_ptr() if offset is not None else None, _threads(),
    )  # fmt: skip
    if rc == 1:
        raise ValueError(_NONFINITE_MSG)
    if rc == 2:
        raise ValueError("block value range overflows float32")
    return packed, scale, offset


def dequantize_4bit_int(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor],
    blocksize: int,
    shape: ShapeLike,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit_int`: ``(code-8)*scale`` (symmetric, ``offset is None``)
    or ``code*scale + offset`` (asymmetric); via :func:`dequantize_4bit_lut`."""
    symmetric = offset is None
    dev = packed.device if isinstance(packed, torch.Tensor) else None
    return dequantize_4bit_lut(packed, scale, int4_code(symmetric, dev), blocksize, shape, out_dtype, offset)


# --------------------------------------------------------------------------- #
# 8-bit blockwise and double quantization
# --------------------------------------------------------------------------- #


def quantize_blockwise_8bit(
    x: torch.Tensor, code256: Optional[torch.Tensor] = None, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization, bit-exact with bnb's CPU ``quantize_blockwise``.

    Args:
        x: fp32 (or bf16/fp16, converted exactly) tensor of any shape; not modified.
        code256: sorted 256-entry code (default :func:`dynamic_map_8bit`).
        blocksize: power of two in [32, 4096] (bnb's double quantization uses 256).

    Returns:
        ``(codes, absmax)``: uint8 of ``x.shape`` and fp32 ``[nblocks]``.
    """
    _check_blocksize(blocksize)
    x = _check_input(x)
    code256 = _code256(code256, x.device)
    shape = x.shape
    xf = x.reshape(-1).float()
    n = xf.numel()
    lib = _native_for(xf)
    if lib is None:
        _check_finite(xf)
        q, absmax = reference.quantize_blockwise_8bit(xf, code256, blocksize)
        return q.view(shape), absmax
    lut = reference.bnb8_lut(code256)
    q = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(_nblocks(n, blocksize), dtype=torch.float32)
    rc = lib.qp_quantize_8bit(xf.data_ptr(), n, blocksize, lut.data_ptr(), q.data_ptr(), absmax.data_ptr(), _threads())
    if rc:
        raise ValueError(_NONFINITE_MSG)
    return q.view(shape), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code256: Optional[torch.Tensor] = None,
    blocksize: int = 256,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code256[q] * absmax[b]`` (fp32, then rounded to ``out_dtype``); bit-exact with bnb's
    ``dequantize_blockwise``. Returns a tensor of ``codes.shape``."""
    _check_blocksize(blocksize)
    _check_out_dtype(out_dtype)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError("codes must be a uint8 tensor")
    if codes.numel() == 0:
        raise ValueError("codes is empty")
    shape = codes.shape
    c = codes.contiguous().reshape(-1)
    n = c.numel()
    lib = _native_for(c)
    absmax = _check_stats(absmax, _nblocks(n, blocksize), "absmax", c.device, lib is None)
    code256 = _code256(code256, c.device)
    if lib is None:
        gpu = _gpu_kernels(c)
        if gpu is not None and out_dtype == torch.float32:
            return gpu.dequantize_blockwise_8bit(c, absmax, code256, blocksize).view(shape)
        return reference.dequantize_blockwise_8bit(c, absmax, code256, blocksize, out_dtype).view(shape)
    out = torch.empty(shape, dtype=out_dtype)
    rc = lib.qp_dequantize_8bit(
        c.data_ptr(), absmax.data_ptr(), code256.data_ptr(), n, blocksize, out.data_ptr(), _DT_CODE[out_dtype], _threads()
    )
    if rc:
        raise ValueError(_NONFINITE_MSG)
    return out


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Quantize 4-bit absmax statistics like ``quantize_4bit(..., compress_statistics=True)``.

    ``offset = absmax.mean()``; ``codes, absmax2 = quantize_blockwise_8bit(absmax - offset,
    dynamic_map_8bit(), blocksize)``. Matches bnb's nested state: ``quant_state.absmax``
    (codes), ``quant_state.state2.absmax`` (absmax2), ``quant_state.offset``, and
    ``quant_state.state2.code`` (code256).

    Returns:
        ``(codes uint8 [nblocks], absmax2 fp32 [ceil(nblocks/blocksize)], offset, code256)``.
    """
    _check_blocksize(blocksize)
    absmax = _check_input(absmax, "absmax").reshape(-1).float()
    offset_t = absmax.mean()  # NaN/Inf in absmax propagate into absmax - offset and are caught there
    code256 = dynamic_map_8bit(absmax.device)
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset_t, code256, blocksize)
    return codes, absmax2, float(offset_t), code256


def double_dequantize(
    codes: torch.Tensor,
    absmax2: torch.Tensor,
    offset: Union[float, torch.Tensor],
    code256: Optional[torch.Tensor] = None,
    blocksize: int = 256,
) -> torch.Tensor:
    """Recover fp32 absmax from :func:`double_quantize`: ``code256[q] * absmax2[b] + offset``
    (exactly bnb's ``dequantize_blockwise(...); absmax += offset``)."""
    gpu = _gpu_kernels(codes) if isinstance(codes, torch.Tensor) and _native_for(codes) is None else None
    if gpu is not None:
        _check_blocksize(blocksize)
        c = codes.contiguous().reshape(-1)
        a2 = _check_stats(absmax2, _nblocks(c.numel(), blocksize), "absmax", c.device, True)
        return gpu.dequantize_blockwise_8bit(c, a2, _code256(code256, c.device), blocksize, float(offset))
    out = dequantize_blockwise_8bit(codes, absmax2, code256, blocksize, torch.float32).reshape(-1)
    off = torch.as_tensor(offset, dtype=torch.float32, device=out.device)
    return out + off


# --------------------------------------------------------------------------- #
# fused dequantize-matmul by tiles
# --------------------------------------------------------------------------- #

#: Up to this many rows of input, :func:`matmul_4bit_lut` on CUDA runs Triton's fused kernel
#: (generation); more rows dequantize the weight (Triton) and use cuBLAS.
FUSED_GPU_MAX_ROWS = 16

#: Bytes of fp32 weight one thread decodes at a time in the fused products (the tile stays in
#: its core's L2 cache while the BLAS multiplies it).
TILE_BYTES = 1 << 20


def tile_rows_for(rows: int, cols: int, blocksize: int, tile_bytes: int = 0) -> int:
    """Rows per tile of a ``rows x cols`` weight: about ``tile_bytes`` (default :data:`TILE_BYTES`)
    of fp32, and a multiple of ``blocksize / gcd(cols, blocksize)`` so that every tile starts on a
    block boundary (blocks are flat, so they may span rows)."""
    align = blocksize // math.gcd(cols, blocksize)
    per = max(1, (tile_bytes or TILE_BYTES) // (4 * cols))
    return min(rows if rows % align == 0 else -(-rows // align) * align, max(align, per // align * align))


def fused_matmul_available(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether :func:`matmul_4bit_lut` runs fused on ``device`` (CPU tensors, the C kernels built and
    torch's BLAS found); otherwise it dequantizes the whole weight and calls torch's matmul."""
    return torch.device(device).type == "cpu" and native.blas() is not None


def matmul_4bit_lut(
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    offset: Optional[torch.Tensor] = None,
    transpose: bool = True,
    tile_bytes: int = 0,
) -> torch.Tensor:
    """``a @ W.T`` (``transpose=True``, a linear layer's forward) or ``a @ W`` (``transpose=False``,
    its input gradient) for the 4-bit weight ``W`` of ``shape = (rows, cols)`` stored as in
    :func:`dequantize_4bit_lut`, computed in ``a``'s dtype, without materializing ``W`` where a
    fused kernel applies: fp32 on CPU (below), or up to :data:`FUSED_GPU_MAX_ROWS` rows of ``a``
    on CUDA (``x @ W.T`` by Triton, any dtype, summed in fp32).

    On CPU each thread decodes a tile of ``W`` (about ``tile_bytes``, see :func:`tile_rows_for`)
    into a small buffer and multiplies it at once with torch's own BLAS (``sgemm``); the result
    equals ``a @ dequantize_4bit_lut(...).T`` within float rounding (the BLAS may order the
    sums differently for a tile than for the whole matrix; the input gradient sums the tiles in
    row order). Elsewhere (CUDA, no compiler, no BLAS found) it is exactly that unfused expression.

    Args:
        a: fp32/bf16/fp16 tensor ``[..., cols]`` (``transpose=True``) or ``[..., rows]``.
        packed, absmax, code, blocksize, offset: the 4-bit state (``absmax`` already fp32,
            i.e. double quantization decoded).
        shape: ``(rows, cols)`` of ``W``.

    Returns:
        tensor ``[..., rows]`` or ``[..., cols]`` in ``a``'s dtype.
    """
    _check_blocksize(blocksize)
    rows, cols = (int(d) for d in shape)
    if a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"a has unsupported dtype {a.dtype}; expected float32, bfloat16 or float16")
    inner = cols if transpose else rows
    if a.shape[-1] != inner:
        raise ValueError(f"a has {a.shape[-1]} features, expected {inner}")
    n = rows * cols
    packed = _check_packed(packed, n)
    dev = packed.device
    nb = _nblocks(n, blocksize)
    fused = a.dtype == torch.float32 and a.device == dev and fused_matmul_available(dev) and a.numel() > 0
    absmax = _check_stats(absmax, nb, "absmax", dev, not fused)
    if offset is not None:
        offset = _check_stats(offset, nb, "offset", dev, not fused)
    code = _code16(code, dev)
    lead = a.shape[:-1]
    if not fused:
        gpu = _gpu_kernels(packed)
        if gpu is not None and transpose and a.device == dev and a.numel() // inner <= FUSED_GPU_MAX_ROWS:
            a2 = a.reshape(-1, inner).contiguous()
            return gpu.matmul_4bit_lut(a2, packed, absmax, code, blocksize, rows, cols, offset).view(*lead, rows)
        w = dequantize_4bit_lut(packed, absmax, code, blocksize, (rows, cols), a.dtype, offset)
        return a @ w.t() if transpose else a @ w
    lib = native.get_lib()
    sgemm, _ = native.blas()
    a2 = a.reshape(-1, inner)
    # the forward kernel reads x with row stride ``cols``; the input gradient takes g's row stride
    if a2.stride(-1) != 1 or (a2.stride(0) != inner if transpose else a2.stride(0) < inner):
        a2 = a2.contiguous()
    m = a2.shape[0]
    if max(m, rows, cols, a2.stride(0)) >= 2**31:
        raise ValueError("matmul_4bit_lut: dimensions must be below 2**31")
    off = offset.data_ptr() if offset is not None else None
    if transpose:
        out = torch.empty(m, rows, dtype=torch.float32)
        tr = tile_rows_for(rows, cols, blocksize, tile_bytes)
        rc = lib.qp_matmul_4bit_lut_xwt(
            a2.data_ptr(), m, cols, rows, packed.data_ptr(), absmax.data_ptr(), off, code.data_ptr(), blocksize,
            out.data_ptr(), rows, tr, sgemm, _threads(),
        )  # fmt: skip
        out_features = rows
    else:
        out = torch.empty(m, cols, dtype=torch.float32)
        elems = max(1, (tile_bytes or TILE_BYTES) // 4)
        rc = lib.qp_matmul_4bit_lut_gw(
            a2.data_ptr(), m, cols, rows, a2.stride(0), packed.data_ptr(), absmax.data_ptr(), off, code.data_ptr(),
            blocksize, out.data_ptr(), elems, sgemm, _threads(),
        )  # fmt: skip
        out_features = cols
    if rc == 1:
        raise ValueError(_NONFINITE_MSG)
    if rc:
        raise MemoryError("matmul_4bit_lut: could not allocate a tile buffer")
    return out.view(*lead, out_features)
