"""The Triton kernels (CUDA) checked against the C kernels: dequantization bit for bit for every
builtin format, output dtype and double-quantized scales; the fused matmul within float rounding.
Without a GPU they run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, switched on
by conftest.py before triton is imported); on a CUDA machine on the GPU."""

from __future__ import annotations

import pytest
import torch

import qlora_plugins.core.kernels as K
from qlora_plugins.core.kernels import native

pytest.importorskip("triton", reason="triton is not installed (pip install 'qlora-plugins[triton]')")


@pytest.fixture(scope="module")
def device():
    """Where the kernels run: CPU tensors in the interpreter, else the GPU."""
    from qlora_plugins.core.kernels import triton_kernels

    if native.get_lib() is None:
        pytest.skip("native C kernels unavailable: nothing to compare against")
    if triton_kernels.interpreted():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set, and there is no GPU")


@pytest.fixture
def T(device):
    from qlora_plugins.core.kernels import triton_kernels

    assert triton_kernels.available(device)
    return triton_kernels


def on(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


CASES = [(1000, 64), (777, 32), (4097, 128), (31, 4096)]  # tail blocks, odd counts, one partial block
TABLES = {
    "nf4": (K.nf4_code, None),
    "fp4": (K.fp4_code, None),
    "int4_sym": (lambda: K.int4_code(True), True),
    "int4_asym": (lambda: K.int4_code(False), False),
}


@pytest.mark.parametrize("fmt", list(TABLES))
@pytest.mark.parametrize("n,bs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_4bit_is_bit_exact_with_the_c_kernel(T, device, fmt, n, bs, dtype):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    table, symmetric = TABLES[fmt]
    code = table()
    if symmetric is None:
        packed, absmax = K.quantize_4bit_lut(x, code, bs)
        offset = None
    else:
        packed, absmax, offset = K.quantize_4bit_int(x, bs, symmetric)
    ref = K.dequantize_4bit_lut(packed, absmax, code, bs, (n,), dtype, offset=offset)
    args = on(device, packed, absmax, code)
    ours = T.dequantize_4bit_lut(*args, bs, n, dtype, *on(device, offset))
    assert ours.dtype == dtype and torch.equal(_bits(ours.cpu()), _bits(ref))
    buf = torch.empty(n, dtype=dtype, device=device)
    assert T.dequantize_4bit_lut(*args, bs, n, dtype, *on(device, offset), out=buf).data_ptr() == buf.data_ptr()
    assert torch.equal(_bits(buf.cpu()), _bits(ref))


@pytest.mark.parametrize("nblocks", [5, 256, 300])
def test_double_quantized_scales_are_bit_exact(T, device, nblocks):
    absmax = torch.rand(nblocks, generator=torch.Generator().manual_seed(nblocks)) * 0.1 + 1e-3
    codes, absmax2, offset, code256 = K.double_quantize(absmax)
    ours = T.dequantize_blockwise_8bit(*on(device, codes, absmax2, code256), 256, offset)
    assert torch.equal(_bits(ours.cpu()), _bits(K.double_dequantize(codes, absmax2, offset, code256)))
    plain = T.dequantize_blockwise_8bit(*on(device, codes, absmax2, code256), 256)
    assert torch.equal(_bits(plain.cpu()), _bits(K.dequantize_blockwise_8bit(codes, absmax2, code256, 256)))


@pytest.mark.parametrize("rows,cols,bs", [(37, 100, 64), (64, 96, 32), (3, 5, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_matmul_matches_dequantize_then_matmul(T, device, rows, cols, bs, dtype):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=gen)
    packed, scale, offset = K.quantize_4bit_int(w, bs, symmetric=False)
    x = torch.randn(3, cols, generator=gen).to(dtype)
    dense = K.dequantize_4bit_lut(packed, scale, K.int4_code(False), bs, (rows, cols), offset=offset)
    xd, pd, sd, cd, od = on(device, x, packed, scale, K.int4_code(False), offset)
    y = T.matmul_4bit_lut(xd, pd, sd, cd, bs, rows, cols, od).cpu()
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), x.float() @ dense.t(), rtol=tol, atol=tol)


def test_the_dispatch_routes_through_triton(T, device, monkeypatch):
    """kernels' CUDA route (with CPU tensors: no C kernels, and the Triton module forced)."""
    if device.type != "cpu":
        pytest.skip("checked by the GPU tests on a GPU")
    monkeypatch.setenv("QLORA_PLUGINS_NO_NATIVE", "1")
    monkeypatch.setattr(K, "_gpu_kernels", lambda t: T)
    calls = []
    for name in ("dequantize_4bit_lut", "dequantize_blockwise_8bit", "matmul_4bit_lut"):
        original = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = torch.randn(8, 64)
    packed, absmax = K.quantize_4bit_lut(x, K.nf4_code(), 64)
    ref = K.reference.dequantize_4bit_lut(packed, absmax, K.nf4_code(), 64, 512, torch.float32)
    assert torch.equal(K.dequantize_4bit_lut(packed, absmax, K.nf4_code(), 64, (8, 64)).reshape(-1), ref)
    codes, absmax2, offset, code256 = K.double_quantize(absmax)
    K.double_dequantize(codes, absmax2, offset, code256)
    y = K.matmul_4bit_lut(torch.ones(2, 64), packed, absmax, K.nf4_code(), 64, (8, 64))
    torch.testing.assert_close(y, torch.ones(2, 64) @ ref.view(8, 64).t())
    assert calls == ["dequantize_4bit_lut", "dequantize_blockwise_8bit", "matmul_4bit_lut"]


def test_cuda_backend_choice(monkeypatch):
    monkeypatch.delenv("QLORA_PLUGINS_CUDA_KERNELS", raising=False)
    assert K.cuda_backend() == "triton"
    for value, expected in (("torch", "torch"), ("bitsandbytes", "bitsandbytes"), ("nonsense", "torch")):
        monkeypatch.setenv("QLORA_PLUGINS_CUDA_KERNELS", value)
        assert K.cuda_backend() == expected
