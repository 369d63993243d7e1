"""Triton kernels for CUDA tensors: 4-bit dequantization (every builtin format), 8-bit blockwise
dequantization (double-quantized scales) and a fused dequantize-matmul for a few rows of input
(generation). Optional: ``pip install "qlora-plugins[triton]"``; :func:`available` says whether
they can run, and :mod:`qlora_plugins.core.kernels` falls back to the torch reference otherwise.

The arithmetic is the C kernels' (``code[q] * absmax`` in fp32, ``+ offset`` as a separate
rounding, one rounding to the output dtype; launched with ``enable_fp_fusion=False`` so that no
multiply-add is contracted), so dequantization is bit-identical to them. The fused matmul sums in
fp32 in its own order (equal within float rounding). The test suite runs every kernel on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1``) against the C kernels.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no triton, or a broken install: the torch path is used
    triton = None
    tl = None

_OUT = {}
if tl is not None:
    _OUT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the kernels can run on ``device``: triton importable and a CUDA device (or the
    interpreter, for CPU tensors)."""
    if triton is None:
        return False
    if device is not None and torch.device(device).type == "cpu":
        return interpreted()
    return torch.cuda.is_available() or interpreted()


def _launch_options() -> dict:
    return {} if interpreted() else {"enable_fp_fusion": False}


if triton is not None:

    @triton.jit
    def _dequant_4bit_kernel(
        packed_ptr,
        absmax_ptr,
        offset_ptr,
        code_ptr,
        out_ptr,
        n,
        BS: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        OUT: tl.constexpr,
        BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        v = tl.load(code_ptr + nib, mask=mask, other=0.0) * tl.load(absmax_ptr + idx // BS, mask=mask, other=0.0)
        if HAS_OFFSET:
            v = v + tl.load(offset_ptr + idx // BS, mask=mask, other=0.0)
        if BF16:
            # round-to-nearest-even by hand: the interpreter's float32 -> bfloat16 cast truncates
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + idx, (bits >> 16).to(tl.uint16), mask=mask)
        else:
            tl.store(out_ptr + idx, v.to(OUT), mask=mask)

    @triton.jit
    def _dequant_8bit_kernel(
        q_ptr, absmax_ptr, code_ptr, out_ptr, n, offset, BS: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.int32)
        v = tl.load(code_ptr + q, mask=mask, other=0.0) * tl.load(absmax_ptr + idx // BS, mask=mask, other=0.0)
        if HAS_OFFSET:
            v = v + offset
        tl.store(out_ptr + idx, v, mask=mask)

    @triton.jit
    def _matmul_4bit_kernel(
        x_ptr,
        packed_ptr,
        absmax_ptr,
        offset_ptr,
        code_ptr,
        y_ptr,
        rows,
        cols,
        BS: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        OUT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # y[m, n0:n0+BLOCK_N] = x[m, :] @ W[n0:n0+BLOCK_N, :]^T, W decoded a BLOCK_N x BLOCK_K tile at a time
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, cols, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < cols
            xv = tl.load(x_ptr + m * cols + rk, mask=kmask, other=0.0).to(tl.float32)
            idx = rn[:, None] * cols + rk[None, :]
            mask = (rn[:, None] < rows) & kmask[None, :]
            byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
            nib = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
            w = tl.load(code_ptr + nib, mask=mask, other=0.0) * tl.load(absmax_ptr + idx // BS, mask=mask, other=0.0)
            if HAS_OFFSET:
                w = w + tl.load(offset_ptr + idx // BS, mask=mask, other=0.0)
            acc += tl.sum(w * xv[None, :], axis=1)
        tl.store(y_ptr + m * rows + rn, acc.to(OUT), mask=rn < rows)


_BLOCK = 1024


def dequantize_4bit_lut(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out_dtype: torch.dtype,
    offset: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flat ``n``-element dequantization (arguments already validated by the caller)."""
    out = torch.empty(n, dtype=out_dtype, device=packed.device) if out is None else out.view(-1)
    bf16 = out_dtype == torch.bfloat16
    grid = (triton.cdiv(n, _BLOCK),)
    _dequant_4bit_kernel[grid](
        packed,
        absmax,
        offset if offset is not None else absmax,
        code,
        out.view(torch.uint16) if bf16 else out,
        n,
        BS=blocksize,
        HAS_OFFSET=offset is not None,
        OUT=_OUT[out_dtype],
        BF16=bf16,
        BLOCK=_BLOCK,
        **_launch_options(),
    )
    return out


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code256: torch.Tensor, blocksize: int, offset: Optional[float] = None
) -> torch.Tensor:
    """Flat fp32 ``code256[q] * absmax[b]`` (``+ offset``, rounded separately: bnb's nested absmax)."""
    n = codes.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    grid = (triton.cdiv(n, _BLOCK),)
    _dequant_8bit_kernel[grid](
        codes, absmax, code256, out, n, float(offset or 0.0), BS=blocksize, HAS_OFFSET=offset is not None, BLOCK=_BLOCK, **_launch_options()
    )
    return out


def matmul_4bit_lut(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    rows: int,
    cols: int,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ W.T`` for a contiguous ``x`` of shape ``[m, cols]`` (small ``m``; any float dtype, summed
    in fp32, the result in ``x``'s dtype), fused: W is decoded tile by tile in registers."""
    m = x.shape[0]
    y = torch.empty(m, rows, dtype=x.dtype, device=x.device)
    block_n, block_k = 32, 64
    grid = (triton.cdiv(rows, block_n), m)
    _matmul_4bit_kernel[grid](
        x,
        packed,
        absmax,
        offset if offset is not None else absmax,
        code,
        y,
        rows,
        cols,
        BS=blocksize,
        HAS_OFFSET=offset is not None,
        OUT=_OUT[x.dtype],
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **_launch_options(),
    )
    return y
