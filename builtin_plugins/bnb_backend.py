"""The bitsandbytes backend of the ``nf4``/``fp4`` quantizers (``backend: bitsandbytes``).

Each ``nn.Linear`` (output heads excepted) is replaced, one layer at a time, by a
``bitsandbytes.nn.Linear4bit`` whose ``Params4bit`` holds the packed codes and ``QuantState``
(absmax per block, optionally double-quantized): the interchange format transformers and peft read.
"""

from __future__ import annotations

from typing import Any, Sequence

from qlora_plugins import Footprint
from qlora_plugins.modeling import DEFAULT_SKIP_MODULES, iter_linear_layers, set_submodule, torch_dtype


def quantize_model(model: Any, skip_modules: Sequence[str], quant_type: str, opts: Any) -> None:
    """Replace each ``nn.Linear`` (heads excepted) by a bitsandbytes ``Linear4bit``, layer by layer."""
    import bitsandbytes as bnb
    import torch

    from qlora_plugins.errors import QuantizationError

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
            quant_type=quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=opts.blocksize,
            compress_statistics=opts.double_quant,
            quant_type=quant_type,
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


def footprint(model: Any) -> Footprint:
    """Quantized parameters and bytes (packed weights, absmax, nested absmax and offset) of the
    model's ``Linear4bit`` layers."""
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


def to_bitsandbytes(layer: Any) -> Any:
    """A bitsandbytes ``Linear4bit`` holding exactly the codes and constants of an nf4/fp4
    ``QuantLinear`` (no re-quantization): the interchange format transformers and peft read."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    quantizer = layer.quantizer
    quant_type = getattr(quantizer, "quant_type", "")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"layer {layer.layer_name}: format '{quantizer.name}' has no bitsandbytes equivalent")
    state = layer.state()
    code = quantizer.code().to(state["qweight"].device)
    dtype = layer.compute_dtype
    if "absmax" in state:
        quant_state = QuantState(
            absmax=state["absmax"],
            shape=torch.Size(layer.weight_shape),
            code=code,
            blocksize=quantizer.options.blocksize,
            quant_type=quant_type,
            dtype=dtype,
        )
    else:
        from qlora_plugins import kernels

        nested = QuantState(
            absmax=state["absmax_dq_absmax"], code=kernels.dynamic_map_8bit().to(code.device), blocksize=256, dtype=torch.float32
        )
        quant_state = QuantState(
            absmax=state["absmax_dq_q"],
            shape=torch.Size(layer.weight_shape),
            code=code,
            blocksize=quantizer.options.blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=state["absmax_dq_offset"].reshape(()),
            state2=nested,
        )
    out = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=dtype,
        compress_statistics="absmax" not in state,
        quant_type=quant_type,
        device="meta",
    )
    out.weight = bnb.nn.Params4bit(
        state["qweight"].reshape(-1, 1),
        requires_grad=False,
        quant_state=quant_state,
        blocksize=quantizer.options.blocksize,
        compress_statistics="absmax" not in state,
        quant_type=quant_type,
        bnb_quantized=True,
        module=out,
    )
    if layer.in_features % quantizer.options.blocksize:
        out.support_avx512bf16_for_cpu = False
    if layer.bias is not None:
        out.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
    return out
