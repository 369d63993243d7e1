"""Saving and loading 4-bit checkpoints (what the ``merged_4bit`` exporter writes).

Two formats, chosen by the quantizer:

- **bitsandbytes** (``nf4``/``fp4`` with bitsandbytes' double quantization, or none): the
  transformers + bitsandbytes serialization. ``config.json`` carries a ``BitsAndBytesConfig`` as
  ``quantization_config`` and ``model.safetensors`` holds, for each quantized layer, the packed
  codes as ``<layer>.weight`` plus the ``QuantState`` tensors (``weight.absmax``,
  ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and the packed
  ``weight.quant_state.bitsandbytes__nf4``). Plain ``AutoModelForCausalLM.from_pretrained(dir)``
  loads it when bitsandbytes is installed; qlora-plugins is not needed. Our nf4/fp4 codes are
  bit-exact with bitsandbytes', so nothing is re-quantized on the way.
- **qlora_plugins** (every other :class:`~qlora_plugins.quantized.BlockwiseQuantizer`: ``int4_sym``,
  ``int4_asym``, third-party formats): ``model.safetensors`` holds each quantized layer's
  :class:`~qlora_plugins.quant_linear.QuantLinear` buffers under ``<layer>.<key>`` (``qweight``,
  ``absmax`` or ``absmax_dq_q``/``absmax_dq_absmax``/``absmax_dq_offset``, format-specific keys)
  and ``<layer>.bias``; every other tensor under its usual name. ``config.json`` carries::

      "quantization_config": {
        "quant_method": "qlora_plugins", "format_version": 1,
        "quantizer": "int4_asym", "options": {"blocksize": 64, "double_quant": true, ...},
        "modules": ["model.layers.0.self_attn.q_proj", ...], "compute_dtype": "float32",
        "distribution": "qlora-plugins", "version": "0.1.0"
      }

  :func:`load_model_checkpoint` rebuilds the architecture from ``config.json``, creates the quantizer
  by name through the plugin registry and puts the stored buffers into ``QuantLinear`` layers:
  nothing is re-quantized.

Either format may carry a ``correction/`` directory: an adapter holding a low-rank correction of
the re-quantization error, saved by an adapter plugin that ``correction/qlora_adapter.json`` names
(``{"adapter": "lora"}`` for the ``merged_4bit`` exporter, whose correction is a PEFT LoRA adapter
that ``peft.PeftModel.from_pretrained(model, dir + "/correction")`` also attaches);
:func:`load_model_checkpoint` attaches it through that plugin.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from qlora_plugins.core.errors import ModelError, QloraError
from qlora_plugins.core.modeling import set_submodule

QUANT_METHOD = "qlora_plugins"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CORRECTION_DIR = "correction"
_BNB_TYPES = ("nf4", "fp4")


# --- safetensors integrity -----------------------------------------------------------------


def check_safetensors(path: Path) -> list[str]:
    """The tensor names of ``path`` after checking it is a complete safetensors file.

    :raises ModelError: naming the file, for a corrupt or truncated file.
    """
    from qlora_plugins.core.modeling import check_safetensors_header

    return check_safetensors_header(path, config_path=None)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- layer state conversions ---------------------------------------------------------------


def bnb_compatible(quantizer: Any) -> bool:
    """Whether ``quantizer``'s states are bitsandbytes ``Linear4bit`` states (nf4/fp4 with
    bitsandbytes' 8-bit dynamic double quantization or none)."""
    if getattr(quantizer, "quant_type", None) not in _BNB_TYPES or not callable(getattr(quantizer, "code", None)):
        return False
    options = getattr(quantizer, "options", None)
    if options is None or not hasattr(options, "blocksize"):
        return False
    if getattr(options, "double_quant", False):
        scale = getattr(quantizer, "scale_quantizer", None)
        return getattr(scale, "name", None) == "dynamic8" and getattr(scale, "blocksize", None) == 256
    return True


def state_from_bnb(layer: Any) -> dict:
    """The :class:`QuantLinear` state (our key names) of a bitsandbytes ``Linear4bit`` layer,
    read through its own serialization (which undoes bitsandbytes' CPU repacking)."""
    import torch
    from bitsandbytes.functional import QuantState

    sd = {k: v for k, v in layer.state_dict().items()}
    weight = sd.pop("weight")
    quant = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    qs = QuantState.from_dict(quant, device=weight.device)
    state = {"qweight": weight.reshape(-1).contiguous()}
    if qs.nested:
        state["absmax_dq_q"] = qs.absmax
        state["absmax_dq_absmax"] = qs.state2.absmax
        state["absmax_dq_offset"] = torch.tensor([float(qs.offset)], dtype=torch.float32, device=weight.device)
    else:
        state["absmax"] = qs.absmax.float()
    return state


def bnb_tensors(state: dict, quantizer: Any, shape: Iterable[int], compute_dtype: Any) -> dict:
    """The tensors bitsandbytes' ``Linear4bit`` serializes for ``weight`` (keys relative to the
    layer: ``weight``, ``weight.absmax``, ``weight.quant_map``, ...), from a QuantLinear state."""
    import torch
    from bitsandbytes.functional import QuantState

    from qlora_plugins.core import kernels

    code = quantizer.code().to(state["qweight"].device)
    blocksize = quantizer.options.blocksize
    shape = torch.Size(tuple(shape))
    if "absmax" in state:
        qs = QuantState(
            absmax=state["absmax"], shape=shape, code=code, blocksize=blocksize, quant_type=quantizer.quant_type, dtype=compute_dtype
        )
    else:
        nested = QuantState(
            absmax=state["absmax_dq_absmax"], code=kernels.dynamic_map_8bit().to(code.device), blocksize=256, dtype=torch.float32
        )
        qs = QuantState(
            absmax=state["absmax_dq_q"],
            shape=shape,
            code=code,
            blocksize=blocksize,
            quant_type=quantizer.quant_type,
            dtype=compute_dtype,
            offset=state["absmax_dq_offset"].reshape(()),
            state2=nested,
        )
    out = {"weight": state["qweight"].reshape(-1, 1)}
    for key, value in qs.as_dict(packed=True).items():
        out[f"weight.{key}"] = value
    return out


# --- saving --------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _dedupe(tensors: dict) -> dict:
    """Drop second names of tensors sharing storage (tied weights); contiguous CPU copies."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def quantized_modules(model: Any) -> list[str]:
    """Names of the model's QuantLinear layers."""
    from qlora_plugins.core.quant_linear import QuantLinear

    return [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def _unquantized_linear_names(model: Any) -> list[str]:
    """Full names of linear (and GPT-2 Conv1D) layers left in full precision: transformers'
    bitsandbytes loader must be told not to convert them."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(name)
    return names


def save_model_checkpoint(model: Any, directory: Path, quantizer: Any, *, quantizer_source: dict | None = None) -> dict:
    """Write ``model`` (a plain transformers model whose quantized layers are QuantLinear, all
    made by ``quantizer``) into the empty ``directory`` as ``config.json`` + ``model.safetensors``
    (+ ``generation_config.json``); return facts for the manifest.

    The bitsandbytes format is used when :func:`bnb_compatible`, else the qlora_plugins format.
    """
    import copy

    import torch
    from safetensors.torch import save_file

    modules = quantized_modules(model)
    layers = {name: model.get_submodule(name) for name in modules}
    for name, layer in layers.items():
        if layer.quantizer.name != quantizer.name or layer.quantizer.options != quantizer.options:
            raise QloraError(
                f"layer {name} was quantized by '{layer.quantizer.name}', not by '{quantizer.name}'; cannot save one checkpoint"
            )
    float_dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    dtype = next(iter(float_dtypes)) if len(float_dtypes) == 1 else torch.float32
    compute_dtypes = {layer.compute_dtype for layer in layers.values()}
    compute_dtype = next(iter(compute_dtypes)) if compute_dtypes else dtype
    use_bnb = bool(modules) and bnb_compatible(quantizer)

    tensors: dict = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if use_bnb and owner in layers and name != f"{owner}.bias":
            continue
        tensors[name] = tensor
    if use_bnb:
        for name, layer in layers.items():
            for key, value in bnb_tensors(layer.state(), quantizer, layer.weight_shape, layer.compute_dtype).items():
                tensors[f"{name}.{key}"] = value
    tensors = _dedupe(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if use_bnb:
        from transformers import BitsAndBytesConfig

        skip = sorted(set(_unquantized_linear_names(model)))
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantizer.quant_type,
            bnb_4bit_use_double_quant=bool(quantizer.options.double_quant),
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=skip or None,
        ).to_dict()
        fmt = "bitsandbytes"
    else:
        from qlora_plugins.core.options import options_to_dict

        qconfig = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "quantizer": quantizer.name,
            "options": options_to_dict(quantizer.options),
            "modules": modules,
            "compute_dtype": _dtype_name(compute_dtype),
            **(quantizer_source or {}),
        }
        fmt = QUANT_METHOD
    config.quantization_config = qconfig
    config.save_pretrained(str(directory))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(directory))
    return {
        "checkpoint_format": fmt,
        "quantizer": quantizer.name,
        "quantized_layers": len(modules),
        "dtype": _dtype_name(dtype),
        "compute_dtype": _dtype_name(compute_dtype),
    }


# --- loading -------------------------------------------------------------------------------


def read_config(directory: Path) -> dict:
    """``config.json`` of a checkpoint directory as a mapping."""
    path = directory / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a checkpoint directory (no config.json)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None


def _no_init():
    """transformers' ``no_init_weights`` context (skips random init), or a null context."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _load_own_format(directory: Path, config_dict: dict, auto_class: Any, registry: Any, device: str) -> Any:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from qlora_plugins.core.modeling import torch_dtype
    from qlora_plugins.core.quant_linear import QuantLinear

    qconfig = config_dict["quantization_config"]
    version = qconfig.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"{directory}: qlora_plugins checkpoint format version {version!r} is not supported (expected {FORMAT_VERSION})")
    name = qconfig.get("quantizer")
    if registry is None:
        from qlora_plugins.core.registry import create_registry

        registry = create_registry()
    quantizer = registry.create("quantizer", name, qconfig.get("options") or {}, "config.json:quantization_config")
    weights = directory / WEIGHTS_NAME
    check_safetensors(weights)
    tensors = load_file(str(weights), device="cpu")

    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init():
        model = auto_class.from_config(config, dtype=config.dtype)
    compute = torch_dtype(qconfig.get("compute_dtype") or "float32")
    module_names = list(qconfig.get("modules") or [])
    for module_name in module_names:
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise ModelError(f"{weights}: quantized layer {module_name} does not exist in the {config.model_type} architecture") from None
        prefix = f"{module_name}."
        state = {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        bias = state.pop("bias", None)
        if not state:
            raise ModelError(f"{weights}: no tensors for quantized layer {module_name}")
        if hasattr(linear, "in_features"):
            in_features, out_features = linear.in_features, linear.out_features
        else:  # transformers' Conv1D stores its weight as (in, out)
            in_features, out_features = linear.weight.shape
        layer = QuantLinear(in_features, out_features, quantizer, state, bias, compute, module_name)
        try:  # decoding proves the state matches the layer's shape
            layer.dequantize(torch.float32)
        except Exception as exc:
            raise ModelError(f"{weights}: state of {module_name} does not decode to {tuple(layer.weight_shape)}: {exc}") from None
        set_submodule(model, module_name, layer)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelError(f"{weights}: unexpected tensors for this architecture: {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    everything = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    loaded = {everything[k].data_ptr() for k in tensors if k in everything}
    own = tuple(f"{m}." for m in module_names)
    missing = [k for k in result.missing_keys if not k.startswith(own) and (k not in everything or everything[k].data_ptr() not in loaded)]
    if missing:
        raise ModelError(f"{weights}: missing tensors: {', '.join(missing[:5])}")
    return model.to(device).eval()


def load_model_checkpoint(
    directory: Path, task: str = "causal_lm", registry: Any = None, device: str = "cpu", with_correction: bool = True
) -> Any:
    """Load a checkpoint directory written by :func:`save_model_checkpoint` (either format) or any plain
    transformers checkpoint, attaching a ``correction/`` adapter when present.

    :param registry: resolves the quantizer of the qlora_plugins format by name (default: a fresh
        registry with the installed plugins).
    """
    from qlora_plugins.core.modeling import auto_class as auto_for

    directory = Path(directory)
    config = read_config(directory)
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights)
    auto_class = auto_for(task)
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") == QUANT_METHOD:
        model = _load_own_format(directory, config, auto_class, registry, device)
    else:
        kwargs = {"device_map": {"": device}} if device != "cpu" else {}
        model = auto_class.from_pretrained(str(directory), **kwargs).eval()
    correction = directory / CORRECTION_DIR
    if with_correction and (correction / CORRECTION_ADAPTER_FILE).is_file():
        model = attach_adapter_dir(model, correction, task, registry)
    return model


#: In a checkpoint's correction directory: which adapter plugin saved it (``{"adapter": NAME}``).
CORRECTION_ADAPTER_FILE = "qlora_adapter.json"


def attach_adapter_dir(model: Any, directory: Path, task: str, registry: Any = None) -> Any:
    """Attach the adapter saved in ``directory`` to ``model`` through the adapter plugin that
    saved it (named in ``qlora_adapter.json``).

    :raises ModelError: the directory names no adapter plugin, or one that is not installed.
    """
    from qlora_plugins.core.errors import QloraError
    from qlora_plugins.core.interfaces import AdapterContext

    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights)
    try:
        name = json.loads((directory / CORRECTION_ADAPTER_FILE).read_text(encoding="utf-8"))["adapter"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{directory}: {CORRECTION_ADAPTER_FILE} does not name the adapter plugin that saved it") from None
    if registry is None:
        from qlora_plugins.core.registry import create_registry

        registry = create_registry()
    try:
        adapter = registry.create("adapter", name, {}, f"{directory / CORRECTION_ADAPTER_FILE}")
    except QloraError as exc:
        raise ModelError(str(exc)) from None
    return adapter.load(model, directory, AdapterContext(task=task, quantized=bool(quantized_modules(model)))).eval()
