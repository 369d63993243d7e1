"""Builtin blockwise 4-bit formats on the project's own kernels: ``nf4``, ``fp4``, ``int4_sym``,
``int4_asym``. Formulas are in docs/quantization.md; kernels in :mod:`qlora_plugins.core.kernels`.

``nf4`` and ``fp4`` are bit-exact with bitsandbytes (codes, packing, absmax and double-quantized
state) and can still be run through bitsandbytes' own ``Linear4bit`` with ``backend: bitsandbytes``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import attrs

from qlora_plugins import Footprint, hookimpl
from qlora_plugins.quantized import BlockwiseOptions, BlockwiseQuantizer


def _kernels():
    from qlora_plugins import kernels

    return kernels


@attrs.define
class LutOptions(BlockwiseOptions):
    """nf4/fp4 options: the blockwise ones plus the backend that runs the layers."""

    backend: Literal["native", "bitsandbytes"] = "native"


class _PackedLut(BlockwiseQuantizer):
    """The builtin formats' common state: ``qweight`` (two codes a byte) and per-block ``absmax``
    (and ``offset``), decoded as ``code[q] * absmax (+ offset)``; block ranges are slices of it."""

    def code(self):
        raise NotImplementedError

    def lut_form(self, state):
        form = {"packed": state["qweight"], "absmax": state["absmax"], "code": self.code()}
        if "offset" in state:
            form["offset"] = state["offset"]
        return form

    def decode_blocks(self, state, numel, blocksize, dtype, out=None):
        return _kernels().dequantize_4bit_lut(
            state["qweight"], state["absmax"], self.code(), blocksize, (numel,), dtype, offset=state.get("offset"), out=out
        )

    def decode_block_range(self, state, first, stop, numel, blocksize, dtype, out=None):
        start = first * blocksize
        count = min(stop * blocksize, numel) - start
        sub = {"qweight": state["qweight"][start // 2 : start // 2 + (count + 1) // 2], "absmax": state["absmax"][first:stop]}
        if "offset" in state:
            sub["offset"] = state["offset"][first:stop]
        return self.decode_blocks(sub, count, blocksize, dtype, out=out)


class _LutFormat(_PackedLut):
    Options = LutOptions
    quant_type: ClassVar[str] = ""

    def encode_blocks(self, weight, blocksize):
        packed, absmax = _kernels().quantize_4bit_lut(weight, self.code(), blocksize)
        return {"qweight": packed, "absmax": absmax}

    # backend: bitsandbytes keeps the anchor stack's Linear4bit layers
    def load_model(self, request: Any) -> Any:
        if self.options.backend == "bitsandbytes":
            model = request.load_full_precision()
            self.quantize_model(model, request.skip_modules)
            return model
        return super().load_model(request)

    def quantize_model(self, model: Any, skip_modules: Sequence[str]) -> None:
        if self.options.backend == "bitsandbytes":
            from qlora_plugins.builtin_plugins import bnb_backend

            bnb_backend.quantize_model(model, skip_modules, self.quant_type, self.options)
        else:
            super().quantize_model(model, skip_modules)

    def footprint(self, model: Any) -> Footprint:
        if self.options.backend == "bitsandbytes":
            from qlora_plugins.builtin_plugins import bnb_backend

            return bnb_backend.footprint(model)
        return super().footprint(model)

    def sharding_refusal(self) -> str | None:
        if self.options.backend == "bitsandbytes":
            return (
                "quantizer.backend: bitsandbytes keeps each weight's QuantState outside the parameters, "
                "which FSDP cannot shard; use backend: native (same codes) with train.distributed: fsdp"
            )
        return None

    def metadata(self) -> dict:
        meta = super().metadata()
        meta["backend"] = "bitsandbytes" if self.options.backend == "bitsandbytes" else f"qlora_plugins ({_kernels().backend_name()})"
        return meta


class NF4(_LutFormat):
    """4-bit NormalFloat (QLoRA's default): 16 quantiles of N(0,1), blockwise absmax; bit-exact with bitsandbytes."""

    name = "nf4"
    quant_type = "nf4"
    default = True  # what a config without a quantizer section gets

    def code(self):
        return _kernels().nf4_code()


class FP4(_LutFormat):
    """4-bit float (bitsandbytes' e2m1 table), blockwise absmax; bit-exact with bitsandbytes."""

    name = "fp4"
    quant_type = "fp4"

    def code(self):
        return _kernels().fp4_code()


class Int4Symmetric(_PackedLut):
    """INT4 symmetric: q in [-8, 7], scale = absmax/8 per block, w = q * scale."""

    name = "int4_sym"

    def code(self):
        return _kernels().int4_code(True)

    def encode_blocks(self, weight, blocksize):
        packed, scale, _ = _kernels().quantize_4bit_int(weight, blocksize, symmetric=True)
        return {"qweight": packed, "absmax": scale}


class Int4Asymmetric(_PackedLut):
    """INT4 asymmetric: q in [0, 15], scale = (max-min)/15 and zero offset = min per block, w = q * scale + min."""

    name = "int4_asym"
    scale_keys = ("absmax", "offset")

    def code(self):
        return _kernels().int4_code(False)

    def encode_blocks(self, weight, blocksize):
        packed, scale, offset = _kernels().quantize_4bit_int(weight, blocksize, symmetric=False)
        return {"qweight": packed, "absmax": scale, "offset": offset}


@hookimpl
def register_quantizers(register):
    register(NF4)
    register(FP4)
    register(Int4Symmetric)
    register(Int4Asymmetric)
