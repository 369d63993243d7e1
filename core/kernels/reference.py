"""Pure-torch reference implementations of the blockwise quantization kernels.

This module is the *definition of correctness* for :mod:`qlora_plugins.core.kernels`:
the C kernels in ``blockwise.c`` must produce bit-identical results. It is also
the fallback when no C compiler is available and the path taken for CUDA
tensors. Every function here works on any device.

The functions in this module do **no** argument validation; the public
wrappers in ``qlora_plugins.core.kernels`` validate and then dispatch. All
inputs are expected flattened and contiguous (``x.reshape(-1)``).

See the package docstring for the exact formulas.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from functools import lru_cache
from typing import Optional

import torch

__all__ = [
    "nf4_code",
    "fp4_code",
    "int4_code",
    "dynamic_map_8bit",
    "lut_bounds",
    "bnb8_boundaries",
    "bnb8_lut",
    "quantize_4bit_lut",
    "dequantize_4bit_lut",
    "quantize_4bit_int",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
]

# --------------------------------------------------------------------------- #
# Code tables
# --------------------------------------------------------------------------- #

# NF4: the 16 values of bitsandbytes.functional.get_4bit_type("nf4") (quantiles of
# N(0, 1), normalized to [-1, 1]); python floats that are exactly fp32 values.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, before
# bnb's normalization by the max (12). Index 8 ("-0") is +0.0 in bnb, because the
# literal ``-0`` in its source is the Python int 0.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 NF4 table used by bitsandbytes (index = 4-bit code)."""
    return torch.tensor(_NF4, dtype=torch.float32, device=device)


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 FP4 table used by bitsandbytes (raw values / 12, in fp32)."""
    data = torch.tensor(_FP4_RAW, dtype=torch.float32)
    data = data / data.abs().max()  # same fp32 division as bnb's ``data.div_(data.abs().max())``
    return data.to(device) if device is not None else data


def int4_code(symmetric: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """Code table of the affine int4 formats: [-8..7] (symmetric) or [0..15] (asymmetric)."""
    start = -8.0 if symmetric else 0.0
    return torch.arange(16, dtype=torch.float32, device=device) + start


def dynamic_map_8bit(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, ``create_dynamic_map(signed=True)``.

    Recomputed here with the same torch fp32 operations so bitsandbytes is not
    needed at runtime (equality with bnb is checked by the tests). Returns a new tensor.
    """
    out = _dynamic_map_cpu().clone()
    return out.to(device) if device is not None else out


@lru_cache(maxsize=1)
def _dynamic_map_cpu() -> torch.Tensor:
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def lut_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision thresholds of a 16-entry table, exactly as bnb computes them.

    Returns ``(bounds, order)``: ``order = argsort(code)``, ``bounds`` are the 15
    fp32 midpoints ``(sorted[i] + sorted[i+1]) / 2``. A normalized value ``s`` is
    mapped to ``order[#{j : bounds[j] < s}]`` (ties at a midpoint go to the lower
    entry, as ``torch.bucketize(..., right=False)``).
    """
    code = code.detach().to("cpu", torch.float32)  # on the CPU: fixes argsort's order of tied entries
    order = torch.argsort(code)
    srt = code[order]
    bounds = (srt[:-1] + srt[1:]) / 2
    return bounds, order


def _pack_nibbles(q: torch.Tensor, pad: int) -> torch.Tensor:
    """Pack 4-bit codes two per byte, first element in the high nibble."""
    q = q.to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, torch.full((1,), pad, dtype=torch.uint8, device=q.device)])
    return (q[0::2] << 4) | q[1::2]


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    packed = packed.reshape(-1)
    q = torch.empty(packed.numel() * 2, dtype=torch.long, device=packed.device)
    q[0::2] = (packed >> 4).long()
    q[1::2] = (packed & 0xF).long()
    return q[:n]


def _block_index(n: int, blocksize: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) // blocksize


# --------------------------------------------------------------------------- #
# 4-bit lookup-table formats (nf4 / fp4)
# --------------------------------------------------------------------------- #


def quantize_4bit_lut(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's ``quantize_4bit`` (CPU/default backend) rule, reproduced op for op."""
    bounds, order = lut_bounds(code)
    bounds, order = bounds.to(x.device), order.to(x.device)
    a = x.reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    a_com = a[:full].reshape(blocks, blocksize)
    absmax = a_com.abs().max(dim=-1)[0] if blocks else torch.empty(0, device=a.device)
    scaled = torch.clamp(a_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # Tail block: statistics from the real elements only. Like bnb, its absmax
        # is stored clamped to 1e-38 and it is normalized by a division.
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad nibble = code of 0.0, as bnb
    q = torch.bucketize(scaled, bounds, out_int32=True)
    q = order[q]
    return _pack_nibbles(q, 0), absmax


def dequantize_4bit_lut(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out_dtype: torch.dtype,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``code[q] * absmax[block] (+ offset[block])`` in fp32, then one rounding to ``out_dtype``."""
    code = code.to(device=packed.device, dtype=torch.float32)
    q = _unpack_nibbles(packed, n)
    b = _block_index(n, blocksize, packed.device)
    out = code[q] * absmax.float()[b]
    if offset is not None:
        out = out + offset.float()[b]
    return out.to(out_dtype)


# --------------------------------------------------------------------------- #
# Affine int4
# --------------------------------------------------------------------------- #


def _blocks_padded(a: torch.Tensor, blocksize: int, fill: float) -> torch.Tensor:
    n = a.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    if pad:
        a = torch.cat([a, torch.full((pad,), fill, dtype=a.dtype, device=a.device)])
    return a.view(nb, blocksize)


def quantize_4bit_int(x: torch.Tensor, blocksize: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Affine int4 quantization (formulas in the package docstring)."""
    a = x.reshape(-1).float()
    n = a.numel()
    b = _block_index(n, blocksize, a.device)
    if symmetric:
        absmax = _blocks_padded(a.abs(), blocksize, 0.0).max(dim=1)[0]
        scale = absmax / 8
        s = scale[b]
        q = torch.where(s > 0, torch.clamp(torch.round(a / s), -8, 7), torch.zeros_like(a))
        codes = (q + 8).to(torch.uint8)
        return _pack_nibbles(codes, 0), scale, None
    mn = _blocks_padded(a, blocksize, math.inf).min(dim=1)[0]
    mx = _blocks_padded(a, blocksize, -math.inf).max(dim=1)[0]
    mn = mn + 0.0  # -0.0 -> +0.0
    mx = mx + 0.0
    scale = (mx - mn) / 15
    s = scale[b]
    q = torch.where(s > 0, torch.clamp(torch.round((a - mn[b]) / s), 0, 15), torch.zeros_like(a))
    return _pack_nibbles(q.to(torch.uint8), 0), scale, mn


# --------------------------------------------------------------------------- #
# 8-bit blockwise (bnb's double quantization of the absmax statistics)
# --------------------------------------------------------------------------- #

_LUT_SIZE = 65536


def _f32(v: float) -> float:
    """Round a Python float to the nearest fp32 value."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _ord_to_f32(i: int) -> float:
    """Inverse of :func:`_f32_to_ord`."""
    bits = i if i >= 0 else ((-i - 1) | 0x80000000)
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _f32_to_ord(v: float) -> int:
    """Monotone map fp32 -> int (-0.0 and +0.0 map to -1 and 0)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    if bits & 0x80000000:
        return -((bits & 0x7FFFFFFF) + 1)
    return bits


def _bnb8_lut_index(v: float) -> int:
    """Exact emulation of bnb's ``norm_to_lut_index`` for an fp32 ``v``.

    bnb computes ``(uint16)(int)fmaf((clamp(v,-1,1) + 1.0f) * 0.5f, 65535.0f, 0.5f)``
    (its compiler fuses the multiply-add). ``t * 65535`` is exact in a double; the
    single fp32 rounding of ``t*65535 + 0.5`` followed by truncation is resolved
    exactly by comparing against the rounding midpoint below the next integer.
    """
    v = min(max(v, -1.0), 1.0)
    t = _f32(v + 1.0) * 0.5
    p = t * 65535.0  # exact
    y = Fraction(p) + Fraction(1, 2)
    k = math.floor(y)
    nxt = k + 1
    # half an fp32 ulp of the values just below the integer ``nxt``
    e = math.floor(math.log2(nxt - 0.5))
    half_ulp = Fraction(2) ** (e - 24)
    if y >= nxt - half_ulp:  # rounds up to nxt (a tie goes to nxt, whose mantissa is even)
        k = nxt
    return min(k, _LUT_SIZE - 1)


@lru_cache(maxsize=16)
def _bnb8_lut_cached(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    # bnb's build_quantize_lut: fp32 midpoints, fp32 grid values, lut[i] = #{midpoints < grid[i]}
    mids = (code[:-1] + code[1:]) * 0.5
    grid = (torch.arange(_LUT_SIZE, dtype=torch.float32) * 2) / float(_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(mids, grid, right=False).clamp(max=code.numel() - 1).to(torch.uint8)


def _code_bytes(code256: torch.Tensor) -> bytes:
    return code256.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def bnb8_lut(code256: torch.Tensor) -> torch.Tensor:
    """bnb's 65536-entry quantization table for a sorted 256-entry code (uint8, CPU, cached).

    ``q(v) = lut[uint16(fmaf((clamp(v, -1, 1) + 1) * 0.5, 65535, 0.5))]`` is bnb's CPU rule;
    the C kernel evaluates it directly, the torch path through :func:`bnb8_boundaries`.
    """
    return _bnb8_lut_cached(_code_bytes(code256))


@lru_cache(maxsize=16)
def _bnb8_boundaries_cached(code_bytes: bytes) -> tuple[float, ...]:
    lut = _bnb8_lut_cached(code_bytes).tolist()
    # first LUT slot reaching each code index
    first_k = [None] * 256
    j = 0
    for k, c in enumerate(lut):
        while j <= c:
            if first_k[j] is None:
                first_k[j] = k
            j += 1
    lo_ord, hi_ord = _f32_to_ord(-1.0), _f32_to_ord(1.0)
    bounds = [-math.inf]
    for j in range(1, 256):
        k = first_k[j]
        if k is None:
            bounds.append(math.inf)
            continue
        if k == 0:
            bounds.append(-math.inf)
            continue
        if _bnb8_lut_index(1.0) < k:
            bounds.append(math.inf)
            continue
        lo, hi = lo_ord, hi_ord  # invariant: idx(hi) >= k
        if _bnb8_lut_index(_ord_to_f32(lo)) >= k:
            bounds.append(-math.inf)
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _bnb8_lut_index(_ord_to_f32(mid)) >= k:
                hi = mid
            else:
                lo = mid
        bounds.append(_ord_to_f32(hi))
    return tuple(bounds)


def bnb8_boundaries(code256: torch.Tensor) -> torch.Tensor:
    """256 fp32 thresholds ``B`` (``B[0] = -inf``) of bnb's CPU 8-bit quantizer.

    bitsandbytes' CPU ``quantize_blockwise`` maps a normalized value ``v`` through a
    65536-entry lookup table (``lut[uint16((v+1)/2*65535 + 0.5)]``), which is *not*
    exactly "nearest code". The composed map is monotone, so it equals
    ``q(v) = #{j >= 1 : B[j] <= v}`` for the thresholds computed here (exactly, by
    bisection over fp32 values). Cached per code table.
    """
    return torch.tensor(_bnb8_boundaries_cached(_code_bytes(code256)), dtype=torch.float32)


def quantize_blockwise_8bit(x: torch.Tensor, code256: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU ``quantize_blockwise``: ``v = x * (1/absmax)``, ``q = #{B[j] <= v}``; all-zero block -> 0."""
    bnd = bnb8_boundaries(code256).to(x.device)
    a = x.reshape(-1).float()
    n = a.numel()
    absmax = _blocks_padded(a.abs(), blocksize, 0.0).max(dim=1)[0]
    b = _block_index(n, blocksize, a.device)
    inv = (1.0 / absmax)[b]
    v = a * inv
    q = torch.searchsorted(bnd[1:].contiguous(), v, right=True)
    q = torch.where(absmax[b] == 0, torch.zeros_like(q), q)
    return q.to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code256: torch.Tensor, blocksize: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """``code256[q] * absmax[block]`` in fp32, rounded once to ``out_dtype``."""
    code256 = code256.to(device=codes.device, dtype=torch.float32)
    c = codes.reshape(-1).long()
    b = _block_index(c.numel(), blocksize, codes.device)
    return (code256[c] * absmax.float()[b]).to(out_dtype)
