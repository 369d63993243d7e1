"""QuantLinear's products by tiles: the fused C tile kernels (fp32) and the Python tile loop
(every dtype, any format with ``decode_block_range``) against the whole-weight path, on odd shapes
and tail blocks; third-party formats with only whole-tensor decode keep working."""

from __future__ import annotations

import pytest
import torch
from conftest import new_registry

import qlora_plugins.core.kernels as K
from qlora_plugins.core import quant_linear as ql
from qlora_plugins.core.quant_linear import QuantLinear, product_path
from qlora_plugins.quantized import BlockwiseQuantizer

FORMATS = ["nf4", "fp4", "int4_sym", "int4_asym"]
# (out_features, in_features, blocksize): blocks spanning rows, a partial last block, an odd
# element count, a layer smaller than one block, rows a multiple of the blocksize
SHAPES = [(37, 100, 64), (13, 24, 32), (3, 5, 32), (70, 64, 64), (9, 200, 128)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows so that every test shape has several (and a partial last one)."""
    monkeypatch.setattr(ql, "TILE_BYTES", 256)
    monkeypatch.setattr(K, "TILE_BYTES", 1024)


def _layer(name, shape, dtype, double_quant=True, seed=0):
    out_f, in_f, bs = shape
    gen = torch.Generator().manual_seed(seed)
    q = new_registry().create("quantizer", name, {"blocksize": bs, "double_quant": double_quant})
    weight = torch.randn(out_f, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    return QuantLinear(in_f, out_f, q, q.encode(weight, "w"), bias, dtype, "w")


def _run(layer, x, monkeypatch, path):
    monkeypatch.setenv("QLORA_PLUGINS_MATMUL", path)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, product_path(layer, layer.compute_dtype, torch.device("cpu"))


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tiled_products_match_the_whole_weight(name, shape, dtype, monkeypatch, small_tiles):
    layer = _layer(name, shape, dtype)
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    y_whole, g_whole, path = _run(layer, x, monkeypatch, "whole")
    assert path == "whole"
    for forced in ("tiles", "auto"):
        y, g, path = _run(layer, x, monkeypatch, forced)
        if forced == "tiles":
            expected = "tiles"
        elif dtype != torch.float32:
            expected = "whole"  # 16-bit compute decodes the whole weight unless tiles are forced
        else:
            expected = "fused" if K.fused_matmul_available() else "tiles"
        assert path == expected
        if path == "tiles" and dtype != torch.float32:
            # same per-tile 16-bit products as one 16-bit matmul: bit-identical forward
            assert torch.equal(y, y_whole)
        tol = TOL[dtype]
        torch.testing.assert_close(y.float(), y_whole.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(g.float(), g_whole.float(), rtol=tol, atol=tol * 4)


def test_fused_kernel_against_dequantize_then_matmul(small_tiles):
    if not K.fused_matmul_available():
        pytest.skip("fused tile kernels unavailable (no C compiler or BLAS not found)")
    for rows, cols, bs in SHAPES + [(64, 4096, 64)]:
        gen = torch.Generator().manual_seed(rows)
        w = torch.randn(rows, cols, generator=gen)
        for code, (packed, absmax, offset) in (
            (K.nf4_code(), (*K.quantize_4bit_lut(w, K.nf4_code(), bs), None)),
            (K.int4_code(False), K.quantize_4bit_int(w, bs, symmetric=False)),
        ):
            dense = K.dequantize_4bit_lut(packed, absmax, code, bs, (rows, cols), offset=offset)
            for m in (1, 5):
                # views with a row stride wider than the row (as a slice of a fused qkv output is)
                x = torch.randn(m, cols + 7, generator=gen)[:, 3 : 3 + cols]
                g = torch.randn(m, rows + 5, generator=gen)[:, :rows]
                y = K.matmul_4bit_lut(x, packed, absmax, code, bs, (rows, cols), offset=offset)
                gx = K.matmul_4bit_lut(g, packed, absmax, code, bs, (rows, cols), offset=offset, transpose=False)
                torch.testing.assert_close(y, x @ dense.t(), rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(gx, g @ dense, rtol=1e-5, atol=1e-4)


def test_fused_kernel_rejects_non_finite_scales():
    if not K.fused_matmul_available():
        pytest.skip("fused tile kernels unavailable")
    packed, absmax = K.quantize_4bit_lut(torch.randn(8, 64), K.nf4_code(), 64)
    absmax[3] = float("nan")
    for transpose, a in ((True, torch.ones(2, 64)), (False, torch.ones(2, 8))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            K.matmul_4bit_lut(a, packed, absmax, K.nf4_code(), 64, (8, 64), transpose=transpose)
    with pytest.raises(ValueError, match="dtype"):
        K.matmul_4bit_lut(torch.ones(2, 64, dtype=torch.int32), packed, absmax, K.nf4_code(), 64, (8, 64))


def test_matmul_without_native_kernels_is_the_unfused_expression(monkeypatch):
    monkeypatch.setenv("QLORA_PLUGINS_NO_NATIVE", "1")
    assert not K.fused_matmul_available()
    w = torch.randn(10, 96)
    packed, absmax = K.quantize_4bit_lut(w, K.fp4_code(), 32)
    x = torch.randn(3, 96)
    dense = K.dequantize_4bit_lut(packed, absmax, K.fp4_code(), 32, (10, 96))
    assert torch.equal(K.matmul_4bit_lut(x, packed, absmax, K.fp4_code(), 32, (10, 96)), x @ dense.t())


def test_tile_rows_start_on_block_boundaries():
    for rows, cols, bs in [(37, 100, 64), (1000, 4096, 64), (5, 3, 4096), (11008, 4096, 64)]:
        step = K.tile_rows_for(rows, cols, bs, 1 << 16)
        assert step >= 1 and (step * cols) % bs == 0 or step >= rows


class WholeOnly(BlockwiseQuantizer):
    """A third-party format with only whole-tensor decode (no out=, no block ranges)."""

    name = "whole_only_test"

    def encode_blocks(self, weight, blocksize):
        return {"values": weight.to(torch.float16)}

    def decode_blocks(self, state, numel, blocksize, dtype):
        return state["values"].to(dtype)


class Ranged(WholeOnly):
    """The same format with a block-range decode: it gets the tiled path."""

    name = "ranged_test"

    def decode_block_range(self, state, first, stop, numel, blocksize, dtype, out=None):
        part = state["values"][first * blocksize : min(stop * blocksize, numel)].to(dtype)
        return part if out is None else out.copy_(part)


@pytest.mark.parametrize("cls", [WholeOnly, Ranged])
def test_third_party_formats(cls, monkeypatch, small_tiles):
    q = cls(cls.Options(blocksize=32, double_quant=False))
    weight = torch.randn(21, 50)
    layer = QuantLinear(50, 21, q, q.encode(weight, "w"), None, torch.float32, "w")
    x = torch.randn(4, 50)
    monkeypatch.delenv("QLORA_PLUGINS_MATMUL", raising=False)
    expected = "tiles" if cls is Ranged else "whole"
    assert product_path(layer, torch.float32, torch.device("cpu")) == expected
    y, g, _ = _run(layer, x, monkeypatch, "auto")
    dense = weight.to(torch.float16).float()
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-5, atol=1e-5)
    grad_out = torch.linspace(-1, 1, y.numel()).view_as(y)
    torch.testing.assert_close(g, grad_out @ dense, rtol=1e-5, atol=1e-5)


def test_lora_training_under_gradient_checkpointing_matches_the_whole_path(tiny_llama_dir, monkeypatch):
    from qlora_plugins.core.interfaces import AdapterContext, ModelRequest
    from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, auto_class

    q = new_registry().create("quantizer", "nf4", {})
    request = ModelRequest(
        path=tiny_llama_dir,
        task="causal_lm",
        auto_class=auto_class("causal_lm"),
        dtype=torch.float32,
        skip_modules=list(DEFAULT_SKIP_MODULES),
    )
    model = q.load_model(request)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = new_registry().create("adapter", "lora", {"r": 4, "dropout": 0.0}).attach(model, AdapterContext("causal_lm", True))
    model.train()
    with torch.no_grad():  # non-zero B, so the adapters' gradients depend on the base's input gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    batch = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for path in ("whole", "auto"):
        monkeypatch.setenv("QLORA_PLUGINS_MATMUL", path)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        results[path] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert results["auto"][0] == pytest.approx(results["whole"][0], rel=1e-5)
    assert results["auto"][1].keys() == results["whole"][1].keys() and results["auto"][1]
    for name, grad in results["whole"][1].items():
        torch.testing.assert_close(results["auto"][1][name], grad, rtol=1e-3, atol=1e-5)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    expected = "fused" if K.fused_matmul_available() else "tiles"
    assert product_path(layer, torch.float32, torch.device("cpu"), 32) == expected
