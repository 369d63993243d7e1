"""Tests for qlora_plugins.core.kernels (native C kernels and the torch reference)."""

from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qlora_plugins.core.kernels as K
from qlora_plugins.core.kernels import native, reference

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view, so that -0.0 != +0.0 and NaNs compare by payload."""
    t = t.reshape(-1).contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = bits(a.cpu()), bits(b.cpu())
    assert a.shape == b.shape
    mism = (a != b).sum().item()
    assert mism == 0, f"{mism} of {a.numel()} values differ"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: torch's thread pool only adds latency (results do not depend on it)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    """Run a test on the C kernels and on the torch reference."""
    if request.param == "torch":
        monkeypatch.setenv("QLORA_PLUGINS_NO_NATIVE", "1")
        assert K.backend_name() == "torch"
    else:
        monkeypatch.delenv("QLORA_PLUGINS_NO_NATIVE", raising=False)
        if native.get_lib() is None:
            pytest.skip("native kernels unavailable (no C compiler?)")
        assert K.backend_name() == "native"
    return request.param


@pytest.fixture
def bnb():
    """bitsandbytes.functional, with torch.compile disabled inside bnb's CPU fallbacks.

    bnb wraps its generic dequant in torch.compile(dynamic=False), which recompiles
    (seconds) for every shape; eager execution of the same elementwise ops gives the
    same bits (the compiled path is exercised by benchmarks/quant.py).
    """
    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield F


def code_for(qt: str) -> torch.Tensor:
    return K.nf4_code() if qt == "nf4" else K.fp4_code()


# --------------------------------------------------------------------------- #
# code tables
# --------------------------------------------------------------------------- #


def test_code_tables_match_bnb(bnb):
    assert_bits_equal(K.nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))
    assert_bits_equal(K.fp4_code(), bnb.get_4bit_type("fp4", device="cpu"))
    assert_bits_equal(K.dynamic_map_8bit(), bnb.create_dynamic_map(signed=True))


def test_int4_code_tables():
    assert K.int4_code(True).tolist() == list(range(-8, 8))
    assert K.int4_code(False).tolist() == list(range(16))


# --------------------------------------------------------------------------- #
# 4-bit LUT formats vs bitsandbytes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_4bit_matches_bnb(backend, bnb, qt, dtype):
    code = code_for(qt)
    cases = [(64, 1 << 16), (64, (1 << 16) + 37), (128, 1), (32, 33), (256, 257), (4096, 3 * 4096 + 5), (1024, 999)]
    for seed, (bs, n) in enumerate(cases):
        x = (torch.randn(n, generator=gen(seed)) * 10.0 ** (seed % 5 - 2)).to(dtype)
        x0 = x.clone()
        p_ref, st = bnb.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=False)
        p, absmax = K.quantize_4bit_lut(x, code, bs)
        assert_bits_equal(x, x0)  # input not modified
        assert p.dtype == torch.uint8 and p.shape == ((n + 1) // 2,)
        assert_bits_equal(p, p_ref)
        assert_bits_equal(absmax, st.absmax)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_quantize_4bit_exact_ties(backend, bnb, qt):
    """Values exactly on (and one ulp around) every decision threshold, full and tail blocks."""
    code = code_for(qt)
    bounds, _ = reference.lut_bounds(code)
    vals = []
    for b in bounds.tolist():
        t = torch.tensor([b], dtype=torch.float32)
        vals += [t, torch.nextafter(t, torch.tensor([-2.0])), torch.nextafter(t, torch.tensor([2.0])), -t]
    vals = torch.cat(vals)
    for scale in (1.0, 3.0, 0.0078125, 1e-30, 7.3e4):
        block = torch.cat([torch.tensor([scale]), vals * scale, torch.zeros(64 - 1 - vals.numel() % 64)])
        block = block[: (block.numel() // 64) * 64] if block.numel() > 64 else block
        x = torch.cat([block, block[:37]])  # full blocks + a tail block (division path)
        p_ref, st = bnb.quantize_4bit(x, blocksize=64, quant_type=qt)
        p, absmax = K.quantize_4bit_lut(x, code, 64)
        assert_bits_equal(p, p_ref)
        assert_bits_equal(absmax, st.absmax)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_quantize_4bit_zero_blocks(backend, bnb, qt):
    x = torch.zeros(64 * 3 + 5)
    x[64:128] = torch.randn(64, generator=gen(1))
    for xx in (x, torch.zeros(64), torch.zeros(7), torch.zeros(1)):
        p_ref, st = bnb.quantize_4bit(xx, blocksize=64, quant_type=qt)
        p, absmax = K.quantize_4bit_lut(xx, code_for(qt), 64)
        assert_bits_equal(p, p_ref)
        assert_bits_equal(absmax, st.absmax)  # a zero tail block stores 1e-38, like bnb


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_dequantize_4bit_matches_bnb(backend, bnb, qt, out_dtype):
    code = code_for(qt)
    # (blocksize, shape); the last dim is a multiple of the blocksize or the tensor is 1-D,
    # (bnb's AVX512 dequant indexes absmax per row otherwise).
    cases = [(64, (256, 512)), (64, ((1 << 16) + 37,)), (32, (33,)), (128, (1,)), (256, (257,)), (2048, (4096 + 6,))]
    for seed, (bs, shape) in enumerate(cases):
        x = torch.randn(shape, generator=gen(seed)) * 3
        p_ref, st = bnb.quantize_4bit(x, blocksize=bs, quant_type=qt)
        st = copy.copy(st)
        st.dtype = out_dtype
        ref = bnb.dequantize_4bit(p_ref, st)
        p, absmax = K.quantize_4bit_lut(x, code, bs)
        out = K.dequantize_4bit_lut(p, absmax, code, bs, shape, out_dtype)
        assert out.shape == torch.Size(shape) and out.dtype == out_dtype
        assert_bits_equal(out, ref)


@pytest.mark.slow
def test_large_tensor_matches_bnb(backend, bnb):
    """4M weights, several seeds and scales: 100% identical codes; large (streamed) dequant outputs."""
    if backend == "torch":
        pytest.skip("covered by the smaller cases; keeps the suite fast")
    for seed, scale in ((0, 1.0), (1, 0.02), (2, 300.0)):
        x = torch.randn(1 << 22, generator=gen(seed)) * scale
        for qt in ("nf4", "fp4"):
            p_ref, st = bnb.quantize_4bit(x, blocksize=64, quant_type=qt)
            p, absmax = K.quantize_4bit_lut(x, code_for(qt), 64)
            assert_bits_equal(p, p_ref)
            assert_bits_equal(absmax, st.absmax)
            if seed == 0:
                for od in FLOAT_DTYPES:  # >= 8 MB outputs take the streaming-store path
                    st2 = copy.copy(st)
                    st2.dtype = od
                    out = K.dequantize_4bit_lut(p, absmax, code_for(qt), 64, x.shape, od)
                    assert_bits_equal(out, bnb.dequantize_4bit(p_ref, st2))


@pytest.mark.slow
def test_dequantize_into_out_buffer(backend):
    n, bs = (1 << 21) + 101, 64  # > 8 MB of fp32: streaming stores when aligned
    x = torch.randn(n, generator=gen(5))
    p, absmax = K.quantize_4bit_lut(x, K.nf4_code(), bs)
    for od in FLOAT_DTYPES:
        ref = reference.dequantize_4bit_lut(p, absmax, K.nf4_code(), bs, n, od)
        buf = torch.empty(n + 1, dtype=od)
        for out in (buf[:n], buf[1:]):  # aligned and misaligned destinations
            res = K.dequantize_4bit_lut(p, absmax, K.nf4_code(), bs, (n,), od, out=out)
            assert res.data_ptr() == out.data_ptr()
            assert_bits_equal(res, ref)
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize_4bit_lut(p, absmax, K.nf4_code(), bs, (n,), torch.float32, out=torch.empty(n, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize_4bit_lut(p, absmax, K.nf4_code(), bs, (n,), torch.float32, out=torch.empty(n - 1))


# --------------------------------------------------------------------------- #
# 8-bit blockwise and double quantization vs bitsandbytes
# --------------------------------------------------------------------------- #


def test_quantize_blockwise_8bit_matches_bnb(backend, bnb):
    code = K.dynamic_map_8bit()
    for seed, (bs, n) in enumerate([(256, 256 * 40 + 3), (64, 1000), (256, 1)]):
        x = torch.randn(n, generator=gen(seed)) * 2
        x[: min(n, 256)] *= seed % 2  # an all-zero block in odd seeds
        q_ref, st = bnb.quantize_blockwise(x, blocksize=bs)
        q, absmax = K.quantize_blockwise_8bit(x, code, bs)
        assert_bits_equal(q, q_ref)
        assert_bits_equal(absmax, st.absmax)
        for od in FLOAT_DTYPES:
            st2 = copy.copy(st)
            st2.dtype = od
            assert_bits_equal(K.dequantize_blockwise_8bit(q, absmax, code, bs, od), bnb.dequantize_blockwise(q_ref, st2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_blockwise_8bit_half_inputs_match_bnb(backend, bnb, dtype):
    x = (torch.randn(256 * 30 + 7, generator=gen(2)) * 3).to(dtype)
    q_ref, st = bnb.quantize_blockwise(x, blocksize=256)
    q, absmax = K.quantize_blockwise_8bit(x, None, 256)
    assert_bits_equal(q, q_ref)
    assert_bits_equal(absmax, st.absmax)


def test_quantize_blockwise_8bit_thresholds(backend, bnb):
    """Every threshold of bnb's 65536-entry LUT rule, exactly and one ulp on each side."""
    bnd = reference.bnb8_boundaries(K.dynamic_map_8bit())
    b = bnd[torch.isfinite(bnd)]
    v = torch.cat([b, torch.nextafter(b, torch.full_like(b, -2)), torch.nextafter(b, torch.full_like(b, 2))])
    nb = -(-v.numel() // 255)
    blocks = torch.zeros(nb, 256)
    blocks[:, 0] = 1.0  # absmax 1 -> normalized value == x
    flat = torch.cat([v, torch.zeros(nb * 255 - v.numel())])
    blocks[:, 1:] = flat.view(nb, 255)
    x = blocks.reshape(-1)
    q_ref, _ = bnb.quantize_blockwise(x, blocksize=256)
    q, _ = K.quantize_blockwise_8bit(x, None, 256)
    assert_bits_equal(q, q_ref)


def test_quantize_blockwise_8bit_native_equals_reference(monkeypatch):
    """The C kernel evaluates bnb's LUT rule directly, the torch path via thresholds: same codes."""
    for code in (K.dynamic_map_8bit(), torch.linspace(-1, 1, 256), torch.sort(torch.randn(256, generator=gen(9)).tanh())[0]):
        bnd = reference.bnb8_boundaries(code)
        b = bnd[torch.isfinite(bnd)]
        near = torch.cat([b, torch.nextafter(b, torch.full_like(b, -2)), torch.nextafter(b, torch.full_like(b, 2))])
        v = torch.cat([near, torch.rand(200_000, generator=gen(1)) * 2 - 1])
        x = torch.cat([torch.ones(1), v])  # one block of 2^18: absmax 1, v unchanged
        x = torch.cat([x, torch.zeros(-x.numel() % 4096)]) * 3.5  # scaled: v = x * (1/3.5)

        def run():
            return list(K.quantize_blockwise_8bit(x, code, 4096))

        for u, w in zip(*_both_backends(monkeypatch, run)):
            assert_bits_equal(u, w)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_double_quant_matches_bnb_nested_state(backend, bnb, qt):
    for seed, (bs, n) in enumerate([(64, 64 * 300 + 11), (32, 4096)]):
        x = torch.randn(n, generator=gen(seed)) * 0.05
        p_ref, st = bnb.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=True)
        p, absmax = K.quantize_4bit_lut(x, code_for(qt), bs)
        codes, absmax2, offset, code256 = K.double_quantize(absmax)
        assert_bits_equal(p, p_ref)
        assert_bits_equal(codes, st.absmax)
        assert_bits_equal(absmax2, st.state2.absmax)
        assert_bits_equal(torch.tensor(offset, dtype=torch.float32), st.offset)
        assert_bits_equal(code256, st.state2.code)
        for od in FLOAT_DTYPES:
            st2 = copy.copy(st)
            st2.dtype = od
            ref = bnb.dequantize_4bit(p_ref, st2)
            am = K.double_dequantize(codes, absmax2, offset, code256)
            out = K.dequantize_4bit_lut(p, am, code_for(qt), bs, (n,), od)
            assert_bits_equal(out, ref)


# --------------------------------------------------------------------------- #
# native == reference, shapes, tails
# --------------------------------------------------------------------------- #


def _both_backends(monkeypatch, fn):
    monkeypatch.delenv("QLORA_PLUGINS_NO_NATIVE", raising=False)
    if native.get_lib() is None:
        pytest.skip("native kernels unavailable")
    a = fn()
    monkeypatch.setenv("QLORA_PLUGINS_NO_NATIVE", "1")
    b = fn()
    monkeypatch.delenv("QLORA_PLUGINS_NO_NATIVE")
    return a, b


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_native_equals_reference(monkeypatch, dtype, symmetric):
    for seed, (bs, n) in enumerate([(64, 64 * 50), (32, 1), (128, 129), (4096, 4096 * 2 + 77), (64, 1001)]):
        x = (torch.randn(n, generator=gen(seed)) * 5 + (seed - 2)).to(dtype)
        x[: min(n, 64)] = x[0]  # a constant block (scale 0)

        def run():
            p, s, o = K.quantize_4bit_int(x, bs, symmetric)
            outs = [K.dequantize_4bit_int(p, s, o, bs, (n,), od) for od in FLOAT_DTYPES]
            return [p, s] + ([o] if o is not None else []) + outs

        a, b = _both_backends(monkeypatch, run)
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_bits_equal(u, v)


@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
def test_lut_with_offset_native_equals_reference(monkeypatch, qt):
    code = K.int4_code(False) if qt == "int4" else code_for(qt)
    n, bs = 64 * 37 + 13, 64
    x = torch.randn(n, generator=gen(3))
    p, absmax = reference.quantize_4bit_lut(x, code, bs)
    off = torch.randn(absmax.numel(), generator=gen(4))

    def run():
        return [K.dequantize_4bit_lut(p, absmax, code, bs, (n,), od, offset=off) for od in FLOAT_DTYPES]

    for u, v in zip(*_both_backends(monkeypatch, run)):
        assert_bits_equal(u, v)


def test_shapes_and_layout(backend):
    x = torch.randn(3, 5, 7, generator=gen(0))  # n = 105, odd
    p, absmax = K.quantize_4bit_lut(x, K.nf4_code(), 32)
    assert p.shape == (53,) and absmax.shape == (4,)
    out = K.dequantize_4bit_lut(p, absmax, K.nf4_code(), 32, x.shape)
    assert out.shape == x.shape
    # first element in the high nibble; the padding nibble is the code of 0.0 (nf4: 7)
    q = reference._unpack_nibbles(p, 106)
    assert q[-1].item() == 7
    assert (p[0] >> 4).item() == q[0].item()
    # non-contiguous input
    xt = x.transpose(0, 2)
    p2, a2 = K.quantize_4bit_lut(xt, K.nf4_code(), 32)
    p3, a3 = K.quantize_4bit_lut(xt.contiguous(), K.nf4_code(), 32)
    assert_bits_equal(p2, p3)
    assert_bits_equal(a2, a3)


# --------------------------------------------------------------------------- #
# int4 formulas and error bounds
# --------------------------------------------------------------------------- #


def test_int4_symmetric_hand_block(backend):
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.25, -8.0, 7.0, 8.0, 0.125, 0.375] + [0.0] * 22)
    p, scale, off = K.quantize_4bit_int(x, 32, symmetric=True)
    assert off is None
    assert scale.tolist() == [1.0]  # absmax 8 / 8
    q = reference._unpack_nibbles(p, 32) - 8
    # round half to even: 0.5 -> 0, 0.125 -> 0, 0.375 -> 0; +8 clamps to 7
    assert q[:10].tolist() == [0, 1, -1, 0, 0, -8, 7, 7, 0, 0]
    dq = K.dequantize_4bit_int(p, scale, None, 32, (32,))
    assert dq[:10].tolist() == [0.0, 1.0, -1.0, 0.0, 0.0, -8.0, 7.0, 7.0, 0.0, 0.0]
    # all-zero block: scale 0, q 0 (stored code 8)
    p0, s0, _ = K.quantize_4bit_int(torch.zeros(64), 32, True)
    assert s0.tolist() == [0.0, 0.0] and (p0 == 0x88).all()


def test_int4_asymmetric_hand_block(backend):
    x = torch.tensor([2.0, 17.0, 3.0, 2.5, 9.5, 10.5] + [2.0] * 26)
    p, scale, off = K.quantize_4bit_int(x, 32, symmetric=False)
    assert off.tolist() == [2.0] and scale.tolist() == [1.0]
    q = reference._unpack_nibbles(p, 32)
    assert q[:6].tolist() == [0, 15, 1, 0, 8, 8]  # 0.5 -> 0, 7.5 -> 8, 8.5 -> 8
    dq = K.dequantize_4bit_int(p, scale, off, 32, (32,))
    assert dq[:6].tolist() == [2.0, 17.0, 3.0, 2.0, 10.0, 10.0]
    # constant block: scale 0, offset = value, exact reconstruction
    pc, sc, oc = K.quantize_4bit_int(torch.full((40,), -3.25), 32, False)
    assert sc.tolist() == [0.0, 0.0] and oc.tolist() == [-3.25, -3.25]
    assert (K.dequantize_4bit_int(pc, sc, oc, 32, (40,)) == -3.25).all()
    # tail statistics come from the real elements only
    pt, st, ot = K.quantize_4bit_int(torch.tensor([5.0] * 32 + [4.0, 6.0]), 32, False)
    assert ot.tolist() == [5.0, 4.0] and st.tolist()[1] == pytest.approx(2.0 / 15)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bs", [32, 64, 1024])
def test_int4_roundtrip_error_bound(backend, symmetric, bs):
    n = bs * 20 + 9
    x = torch.randn(n, generator=gen(bs)) * torch.rand(n, generator=gen(bs + 1)) * 4 + (0 if symmetric else 1.5)
    p, scale, off = K.quantize_4bit_int(x, bs, symmetric)
    dq = K.dequantize_4bit_int(p, scale, off, bs, (n,))
    s = scale[torch.arange(n) // bs]
    err = (x - dq).abs()
    eps = 1e-5 * (x.abs() + s * 16) + 1e-30
    bound = s / 2 + eps
    if symmetric:
        # values above 7.5*scale are clamped to code 7 (error up to one scale)
        clamped = x > 7.5 * s
        bound = torch.where(clamped, s + eps, bound)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    if not symmetric:
        # the block minimum is reconstructed exactly
        b = torch.arange(n) // bs
        for blk in range(scale.numel()):
            i = torch.nonzero(b == blk).flatten()
            j = i[x[i].argmin()]
            assert dq[j].item() == x[j].item()


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fn", ["lut", "int_sym", "int_asym", "8bit"])
def test_errors(backend, fn):
    def call(x, bs=64):
        if fn == "lut":
            return K.quantize_4bit_lut(x, K.nf4_code(), bs)
        if fn == "8bit":
            return K.quantize_blockwise_8bit(x, None, bs)
        return K.quantize_4bit_int(x, bs, fn == "int_sym")

    with pytest.raises(ValueError, match="empty"):
        call(torch.empty(0))
    for bad in (math.nan, math.inf, -math.inf):
        for dt in FLOAT_DTYPES:
            for pos in (0, 100, 130):  # first block, middle, tail block
                x = torch.randn(131, generator=gen(pos)).to(dt)
                x[pos] = bad
                with pytest.raises(ValueError, match="NaN or Inf"):
                    call(x)
    for dt in (torch.int32, torch.int8, torch.float64, torch.uint8):
        with pytest.raises(ValueError, match="dtype"):
            call(torch.ones(64, dtype=dt))
    for bs in (0, 16, 48, 100, 8192, 2**13, -64, True, 64.0):
        with pytest.raises(ValueError, match="blocksize"):
            call(torch.ones(64), bs)


def test_dequant_errors(backend):
    p, absmax = K.quantize_4bit_lut(torch.randn(100), K.nf4_code(), 32)
    code = K.nf4_code()
    with pytest.raises(ValueError, match="bytes"):
        K.dequantize_4bit_lut(p, absmax, code, 32, (102,))
    with pytest.raises(ValueError, match="absmax"):
        K.dequantize_4bit_lut(p, absmax[:-1], code, 32, (100,))
    with pytest.raises(ValueError, match="blocksize"):
        K.dequantize_4bit_lut(p, absmax, code, 33, (100,))
    with pytest.raises(ValueError, match="out_dtype"):
        K.dequantize_4bit_lut(p, absmax, code, 32, (100,), torch.float64)
    with pytest.raises(ValueError, match="uint8"):
        K.dequantize_4bit_lut(p.to(torch.int16), absmax, code, 32, (100,))
    with pytest.raises(ValueError, match="16 values"):
        K.dequantize_4bit_lut(p, absmax, torch.zeros(8), 32, (100,))
    bad = absmax.clone()
    bad[1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        K.dequantize_4bit_lut(p, bad, code, 32, (100,))
    with pytest.raises(ValueError, match="empty"):
        K.dequantize_4bit_lut(p, absmax, code, 32, (0,))
    with pytest.raises(ValueError, match="range"):
        K.quantize_4bit_int(torch.tensor([-3e38, 3e38] * 16), 32, symmetric=False)


# --------------------------------------------------------------------------- #
# backend selection / fallback
# --------------------------------------------------------------------------- #


def test_no_native_env_forces_torch(monkeypatch):
    x = torch.randn(1000, generator=gen(0))
    monkeypatch.setenv("QLORA_PLUGINS_NO_NATIVE", "1")
    assert K.backend_name() == "torch"
    assert native.get_lib() is None
    p, a = K.quantize_4bit_lut(x, K.nf4_code(), 64)
    pr, ar = reference.quantize_4bit_lut(x, K.nf4_code(), 64)
    assert_bits_equal(p, pr)
    assert_bits_equal(a, ar)


def test_build_failure_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("QLORA_PLUGINS_NO_NATIVE", raising=False)
    monkeypatch.setenv("QLORA_PLUGINS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "find_compiler", lambda: str(tmp_path / "no-such-cc"))
    native._reset_for_tests()
    try:
        with caplog.at_level(logging.DEBUG, logger=native.__name__):
            assert K.backend_name() == "torch"
            p, _ = K.quantize_4bit_lut(torch.randn(100), K.nf4_code(), 32)
            assert p.numel() == 50
        assert any("torch reference" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(native, "find_compiler", lambda: None)
        native._reset_for_tests()
        assert K.backend_name() == "torch"
    finally:
        monkeypatch.undo()
        native._reset_for_tests()


@pytest.mark.slow
def test_concurrent_builds_share_cache(tmp_path):
    """Two fresh processes build into one empty cache at the same time; both load it."""
    if native.find_compiler() is None:
        pytest.skip("no C compiler")
    # load native.py standalone (it does not need torch) to keep the subprocesses light
    script = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("qp_native", {native.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        lib = mod.get_lib()
        assert lib is not None and mod.backend_name() == "native"
        assert lib.qp_abi_version() == mod._ABI_VERSION
        """
    )
    env = dict(os.environ, QLORA_PLUGINS_CACHE=str(tmp_path))
    env.pop("QLORA_PLUGINS_NO_NATIVE", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err.decode()[-2000:]
    files = os.listdir(tmp_path)
    assert len([f for f in files if f.endswith(".so")]) == 1
    assert not [f for f in files if f.endswith(".tmp")]


# --------------------------------------------------------------------------- #
# CUDA (torch path on device)
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu(dtype):
    x = (torch.randn(64 * 100 + 7, generator=gen(0)) * 2).to(dtype)
    xc = x.cuda()
    for code in (K.nf4_code(), K.fp4_code()):
        p, a = K.quantize_4bit_lut(x, code, 64)
        pc, ac = K.quantize_4bit_lut(xc, code, 64)
        assert pc.is_cuda
        assert_bits_equal(pc, p)
        assert_bits_equal(ac, a)
        for od in FLOAT_DTYPES:
            assert_bits_equal(K.dequantize_4bit_lut(pc, ac, code, 64, x.shape, od), K.dequantize_4bit_lut(p, a, code, 64, x.shape, od))
    for sym in (True, False):
        r = K.quantize_4bit_int(x, 64, sym)
        rc = K.quantize_4bit_int(xc, 64, sym)
        for u, v in zip(r, rc):
            if u is not None:
                assert_bits_equal(u, v)
    # the mean may be summed in another order on the GPU: compare given the same offset
    codes_c, a2_c, off_c, c256_c = K.double_quantize(a.cuda())
    codes, a2 = K.quantize_blockwise_8bit(a - torch.tensor(off_c, dtype=torch.float32), None, 256)
    assert_bits_equal(codes_c, codes)
    assert_bits_equal(a2_c, a2)
    assert_bits_equal(K.double_dequantize(codes_c, a2_c, off_c, c256_c), K.double_dequantize(codes, a2, off_c))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = xc.clone()
        bad[5] = math.nan
        K.quantize_4bit_lut(bad, K.nf4_code(), 64)
