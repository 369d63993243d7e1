"""Merging a trained adapter into plain full-precision weights: dequantize each quantized layer,
add the adapter's delta, rebuild the architecture's own layer types."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any


def dequantized_weight(module: Any) -> Any:
    """A layer's weight in fp32, in the layer's own layout: QuantLinear and bitsandbytes 4-bit
    layers are dequantized; anything else returns ``module.weight``."""
    import torch

    from qlora_plugins.core.quant_linear import QuantLinear

    if isinstance(module, QuantLinear):
        return module.dequantize(torch.float32)
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        module.state_dict()  # undoes bitsandbytes' CPU repacking, if any
        weight = module.weight
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def is_quantized_layer(module: Any) -> bool:
    """QuantLinear or a bitsandbytes 4-bit layer."""
    from qlora_plugins.core.quant_linear import QuantLinear

    return isinstance(module, QuantLinear) or getattr(getattr(module, "weight", None), "quant_state", None) is not None


def original_layer_types(model: Any) -> dict[str, type]:
    """Module types of a freshly built (meta device) copy of the architecture, by name: which
    layers are ``nn.Linear`` and which transformers ``Conv1D`` before quantization."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
    except Exception:  # an architecture that cannot be built on the meta device: assume nn.Linear
        return {}
    return {name: type(module) for name, module in skeleton.named_modules()}


def plain_layer(module: Any, weight: Any, original: type | None) -> Any:
    """A full-precision layer with ``weight`` (given in ``(out, in)`` layout for quantized
    layers, in the module's layout otherwise): ``Conv1D`` where the architecture has one."""
    import torch

    bias = getattr(module, "bias", None)
    if is_quantized_layer(module):
        if original is not None and original.__name__ == "Conv1D":
            new = original(weight.shape[0], weight.shape[1])
            new.weight = torch.nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            new.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return new.to(weight.device)
    new = __import__("copy").deepcopy(module)
    new.weight = torch.nn.Parameter(weight.to(module.weight.device), requires_grad=False)
    return new


def finish_plain_model(model: Any, base_model_path: Path | None = None) -> Any:
    """Undo training-time settings on an exported model: gradient checkpointing off, the base
    config's ``use_cache`` back, the 4-bit flag cleared; eval mode."""
    checkpointing = getattr(type(model), "is_activation_checkpointing", None) or getattr(type(model), "is_gradient_checkpointing", None)
    if checkpointing is not None and checkpointing.__get__(model) and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    use_cache = True
    if base_model_path is not None and (Path(base_model_path) / "config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            use_cache = json.loads((Path(base_model_path) / "config.json").read_text(encoding="utf-8")).get("use_cache", True)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = use_cache
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def merged_model(model: Any, adapter: Any, dtype: Any = None, base_model_path: Path | None = None) -> Any:
    """A standalone full-precision copy of a trained model: the adapter's delta weights added to
    its layers (:meth:`Adapter.merge_targets`), the adapter's wrappers removed
    (:meth:`Adapter.unwrap`), every quantized layer dequantized; cast to ``dtype`` if given.
    ``model`` itself is not modified.
    """
    import copy

    import torch

    from qlora_plugins.core.modeling import set_submodule

    work = copy.deepcopy(model)
    with torch.no_grad():
        targets = adapter.merge_targets(work)
        plain = adapter.unwrap(work)
        types = original_layer_types(plain)
        for target in targets:
            weight = dequantized_weight(target.base_layer)
            if target.delta is not None:
                weight = weight + target.delta.to(weight.device)
            set_submodule(plain, target.name, plain_layer(target.base_layer, weight, types.get(target.name)))
        for name, module in list(plain.named_modules()):
            if is_quantized_layer(module):
                set_submodule(plain, name, plain_layer(module, dequantized_weight(module), types.get(name)))
    finish_plain_model(plain, base_model_path)
    if dtype is not None:
        plain.to(dtype)
        plain.config.dtype = dtype
    return plain
