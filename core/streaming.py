"""Quantize while loading: build the model without initializing its weights, then read the
checkpoint tensor by tensor and quantize each linear weight as it arrives.

The skeleton's weights are allocated with ``torch.empty`` and never written, so the operating
system never backs them with memory; each linear's full-precision copy exists only while it is
being quantized. Checkpoints are safetensors (single file or sharded index), in any float dtype.
When a checkpoint's names do not map one-to-one onto the model (legacy names, fused weights), the
loader reports that and the caller falls back to ``from_pretrained`` followed by per-layer
quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, is_skipped, safetensors_files


class StreamingUnsupported(Exception):
    """The checkpoint cannot be streamed onto this model (the caller falls back)."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory."""
    files = safetensors_files(path)
    if not files:
        raise StreamingUnsupported("no safetensors weights")
    return files


def iter_tensors(files: list[Path], keys: set[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` one at a time (each tensor read when asked for)."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if keys is None or name in keys:
                    yield name, handle.get_tensor(name)


def linear_like_layers(model: Any, skip_modules: list[str]) -> dict[str, Any]:
    """``nn.Linear`` and transformers ``Conv1D`` layers to quantize, by module name."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    return {
        name: module
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and not is_skipped(name, skip_modules)
    }


def stream_load(request: Any, make_layer: Callable[[str, Any, Any], Any], skip_modules: list[str]) -> Any:
    """Load ``request.path`` into a fresh model, calling ``make_layer(name, module, weight)`` for
    each linear layer as soon as its weight is read; its return value replaces the module.

    :raises StreamingUnsupported: when names or shapes do not match the model built from config.
    """
    import torch
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from qlora_plugins.core.modeling import set_submodule

    files = checkpoint_files(Path(request.path))
    config = AutoConfig.from_pretrained(str(request.path), trust_remote_code=request.trust_remote_code, **request.model_kwargs)
    with no_init_weights():
        model = request.auto_class.from_config(config, dtype=request.dtype, trust_remote_code=request.trust_remote_code)
    skip = [*skip_modules, *DEFAULT_SKIP_MODULES]
    layers = linear_like_layers(model, skip)
    weight_keys = {f"{name}.weight": name for name in layers}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for key, tensor in iter_tensors(files):
        if key in weight_keys:
            name = weight_keys[key]
            module = layers[name]
            if tuple(tensor.shape) != tuple(module.weight.shape):
                raise StreamingUnsupported(f"{key}: shape {tuple(tensor.shape)} != {tuple(module.weight.shape)}")
            weight = tensor.to(request.dtype)
            if not isinstance(module, torch.nn.Linear):  # Conv1D stores (in, out)
                weight = weight.t().contiguous()
            bias = module.bias
            new = make_layer(name, module, weight)
            set_submodule(model, name, new)
            layers[name] = new
            if bias is not None:
                params[f"{name}.bias"] = new.bias
            seen.add(key)
            del weight, tensor
            continue
        target = params.get(key)
        if target is None:
            target = buffers.get(key)
        if target is None:
            raise StreamingUnsupported(f"checkpoint tensor {key} has no place in the model")
        if tuple(tensor.shape) != tuple(target.shape):
            raise StreamingUnsupported(f"{key}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        seen.add(key)
    missing = {k for k in expected - seen if not k.endswith(".weight") or k not in weight_keys}
    tied = set()
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False):
        model.tie_weights()
        out = model.get_output_embeddings()
        if out is not None:
            tied = {k for k in missing if k.endswith(".weight") and is_skipped(k[: -len(".weight")], DEFAULT_SKIP_MODULES)}
    missing -= tied
    if missing:
        raise StreamingUnsupported(f"tensors missing from the checkpoint: {', '.join(sorted(missing)[:5])}")
    return model.to(request.device).eval()
