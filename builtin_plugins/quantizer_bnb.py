"""Builtin quantizers ``nf4`` and ``fp4``: blockwise 4-bit weights in bitsandbytes' ``Linear4bit``.

Each ``nn.Linear`` (output heads excepted) is replaced, one layer at a time, by a
``bitsandbytes.nn.Linear4bit`` whose ``Params4bit`` holds the packed codes and ``QuantState``
(absmax per block, optionally double-quantized): the interchange format transformers and peft read.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import attrs

from qlora_plugins import Footprint, Quantizer, hookimpl
from qlora_plugins.modeling import DEFAULT_SKIP_MODULES, iter_linear_layers, set_submodule, torch_dtype
from qlora_plugins.options import power_of_two


@attrs.define
class Bnb4bitOptions:
    """Options of the bitsandbytes 4-bit quantizers."""

    blocksize: int = attrs.field(default=64, validator=power_of_two(32, 4096))
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    skip_modules: list[str] = attrs.field(factory=list)


class _Bnb4bit(Quantizer):
    quant_type = ""
    Options = Bnb4bitOptions

    def quantize_model(self, model: Any, skip_modules: Sequence[str]) -> None:
        import bitsandbytes as bnb
        import torch

        from qlora_plugins.errors import QuantizationError

        opts = self.options
        skip = [*skip_modules, *DEFAULT_SKIP_MODULES, *opts.skip_modules]
        for name, linear in iter_linear_layers(model, skip):
            weight = linear.weight.data
            if weight.numel() == 0:
                raise QuantizationError(f"layer {name}: empty weight")
            if not torch.isfinite(weight).all():
                raise QuantizationError(f"layer {name}: weight contains NaN or Inf")
            compute = weight.dtype if opts.compute_dtype == "auto" else torch_dtype(opts.compute_dtype)
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute,
                compress_statistics=opts.double_quant,
                quant_type=self.quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                blocksize=opts.blocksize,
                compress_statistics=opts.double_quant,
                quant_type=self.quant_type,
                module=layer,
            )._quantize(weight.device)
            if linear.in_features % opts.blocksize:
                # bnb's CPU inference repacking assumes whole blocks per row and fails otherwise
                layer.support_avx512bf16_for_cpu = False
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            set_submodule(model, name, layer)
            del linear, weight  # release the full-precision copy before the next layer
        model.is_loaded_in_4bit = True  # peft dispatches its bnb LoRA layers on this flag

    def footprint(self, model: Any) -> Footprint:
        import bitsandbytes as bnb

        params = nbytes = 0
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                state = module.weight.quant_state
                params += module.in_features * module.out_features
                nbytes += module.weight.numel() * module.weight.element_size()
                nbytes += state.absmax.numel() * state.absmax.element_size()
                if state.nested:
                    nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + offset
        return Footprint(params, nbytes)

    def metadata(self) -> dict:
        return {
            "format": self.quant_type,
            "backend": "bitsandbytes",
            "blocksize": self.options.blocksize,
            "double_quant": self.options.double_quant,
        }


class NF4(_Bnb4bit):
    """4-bit NormalFloat (QLoRA's default), blockwise absmax, optional double quantization."""

    name = "nf4"
    quant_type = "nf4"


class FP4(_Bnb4bit):
    """4-bit float (e2m1), blockwise absmax, optional double quantization."""

    name = "fp4"
    quant_type = "fp4"


@hookimpl(trylast=True)
def register_quantizers(register):
    register(NF4)
    register(FP4)
