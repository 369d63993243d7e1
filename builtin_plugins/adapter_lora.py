"""Builtin adapter ``lora``: LoRA through peft, adapters kept in fp32."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, Union

import attrs

from qlora_plugins import Adapter, AdapterContext, MergeTarget, SavedAdapter, hookimpl
from qlora_plugins.errors import ConfigError, ExportError, short_repr
from qlora_plugins.modeling import DEFAULT_SKIP_MODULES, is_skipped
from qlora_plugins.options import in_range, positive
from qlora_plugins.planning import ActivationCoefficients, Architecture, LinearShape

_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}

#: Bytes saved for backward per token and per decoder layer, ``h * hidden + i * intermediate +
#: kv * (kv_heads * head_dim) + c``, by compute dtype and whether LoRA dropout is on. Measured with
#: ``torch.autograd.graph.saved_tensors_hooks`` on transformers 5 ``LlamaForCausalLM`` (sdpa) with
#: peft LoRA on every linear layer (QuantLinear and nn.Linear bases save the same): exact to a few
#: bytes per token on 12 shapes. Dropout doubles the adapters' inputs (mask + dropped copy).
#: (The memory planner's table; docs/memory.md.)
ACTIVATION_BYTES = {
    ("float32", True): ActivationCoefficients(h=64.0, i=20.0, kv=8.0, c=300.0),
    ("float32", False): ActivationCoefficients(h=24.0, i=16.0, kv=8.0, c=300.0),
    ("bfloat16", True): ActivationCoefficients(h=60.0, i=14.0, kv=4.0, c=265.0),
    ("bfloat16", False): ActivationCoefficients(h=36.0, i=10.0, kv=4.0, c=265.0),
}


@attrs.define
class LoraOptions:
    """LoRA hyper-parameters (peft's ``LoraConfig``)."""

    r: int = attrs.field(default=16, validator=in_range(1, 4096))
    alpha: float = attrs.field(default=32, validator=positive)  # 0 would scale every update to nothing
    dropout: float = attrs.field(default=0.05, validator=in_range(0.0, 0.99))  # [0, 1): 1 would drop every input
    target_modules: Union[Literal["all-linear"], list[str]] = attrs.field(default="all-linear")
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] = attrs.field(factory=list)

    @target_modules.validator
    def _check_targets(self, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module (or be 'all-linear')", attribute)


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer (plain, transformers Conv1D, bitsandbytes 4-bit or
    QuantLinear) except output heads: what ``all-linear`` means, for any quantizer's layer type."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from qlora_plugins.quant_linear import QuantLinear

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D, QuantLinear)) and not is_skipped(name, DEFAULT_SKIP_MODULES):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _register_quant_layers(model: Any, config: Any) -> None:
    """Tell peft how to wrap QuantLinear layers (peft's custom-module route)."""
    from qlora_plugins.quant_linear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        from qlora_plugins.builtin_plugins.lora_quant_layer import QuantLoraLinear

        config._register_custom_module({QuantLinear: QuantLoraLinear})


class Lora(Adapter):
    """LoRA (peft): low-rank adapters on the attention and MLP projections, fp32 weights."""

    name = "lora"
    Options = LoraOptions
    default = True  # what a config without an adapter section gets

    # --- planning (``qlora plan``) ------------------------------------------------------------

    def planned_trainable(self, layers: Sequence[LinearShape], arch: Architecture) -> int:
        """``r * (in + out)`` per targeted linear layer (``all-linear``: every one)."""
        targets = self.options.target_modules
        chosen = layers if targets == "all-linear" else [l for l in layers if l.name in targets]
        return sum(self.options.r * (l.in_features + l.out_features) * l.count for l in chosen)

    def planned_activations(self, compute_dtype: str, dtype_bytes: int) -> ActivationCoefficients:
        return ACTIVATION_BYTES[(compute_dtype, self.options.dropout > 0)]

    def planned_label(self) -> str:
        return f"LoRA adapters (r={self.options.r}, fp32)"

    def attach(self, model: Any, context: AdapterContext) -> Any:
        import torch
        from peft import LoraConfig, get_peft_model

        opts = self.options
        targets = opts.target_modules
        if targets == "all-linear":
            targets = linear_module_names(model)
        config = LoraConfig(
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=targets,
            bias=opts.bias,
            use_rslora=opts.use_rslora,
            modules_to_save=opts.modules_to_save or None,
            task_type=_TASK_TYPES[context.task],
        )
        _register_quant_layers(model, config)
        try:
            with warnings.catch_warnings():  # peft warns on custom layer types it dispatches fine
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                peft_model = get_peft_model(model, config)
        except ValueError as exc:
            if "not found in the base model" in str(exc) or "target_modules" in str(exc):
                raise ConfigError("adapter.target_modules", f"{short_repr(opts.target_modules)} matches no module of the model") from None
            raise
        for param in peft_model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        return peft_model

    def save(self, model: Any, directory: Path) -> None:
        """Save the adapter (peft format). peft keeps ``target_modules`` as a set and writes it in
        set order, which changes from process to process; set-valued fields are written sorted, so
        that two identical runs write byte-identical files."""
        restore = []
        for config in (getattr(model, "peft_config", None) or {}).values():
            for key, value in list(vars(config).items()):
                if isinstance(value, (set, frozenset)):
                    restore.append((config, key, value))
                    setattr(config, key, sorted(value, key=str))
        try:
            model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            for config, key, value in restore:
                setattr(config, key, value)

    def load(self, model: Any, directory: Path, context: AdapterContext) -> Any:
        """Attach the adapter saved in ``directory`` (peft format) to ``model``, for inference.

        :raises ExportError: a tensor of the saved adapter found no place in ``model``.
        """
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(str(directory))
        _register_quant_layers(model, config)
        loaded = PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=False)
        _check_every_tensor_loaded(loaded, directory)
        return loaded

    def merge_targets(self, model: Any) -> list[MergeTarget]:
        """Every LoRA layer's base layer and delta weight (the active, unmerged adapters summed),
        named as in :meth:`unwrap`'s model."""
        targets = []
        for name, layer in _tuner_layers(model):
            targets.append(MergeTarget(name=_unwrapped_name(name), base_layer=layer.get_base_layer(), delta=_delta_weight(layer)))
        return targets

    def unwrap(self, model: Any) -> Any:
        """peft's ``unload()``: LoRA layers replaced by their base layers, ``modules_to_save`` by the
        trained copy, nothing merged."""
        if hasattr(model, "peft_config") and hasattr(model, "unload"):
            return model.unload()
        return model

    def saved_info(self, directory: Path) -> SavedAdapter:
        """The base model peft recorded (``base_model_name_or_path``) and, for classification
        adapters, the number of labels of the saved head."""
        import json

        base = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            base = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        return SavedAdapter(base_model=base if isinstance(base, str) else None, num_labels=_saved_num_labels(directory))

    @contextlib.contextmanager
    def swap_in(self, model: Any, directory: Path) -> Iterator[Any]:
        """Load the saved adapter next to the trained one on the same (in-memory) base, activate
        it, and on exit reactivate the trained adapter and delete the loaded one. Refused (the
        check reloads a fresh base instead) when a loaded adapter would write into shared base
        weights: trained biases (``bias`` other than ``none``)."""
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        config = PeftConfig.from_pretrained(str(directory))
        if not isinstance(model, PeftModel) or getattr(config, "bias", "none") != "none":
            raise NotImplementedError
        trained = model.active_adapter
        name = "qlora_reloaded"
        while name in model.peft_config:
            name += "_"
        _register_quant_layers(model, config)
        config.inference_mode = True
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                model.add_adapter(name, config)
            model.train(was_training)  # the new layers are created in training mode (active dropout)
            result = set_peft_model_state_dict(model, load_peft_weights(str(directory), device="cpu"), adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}" in k]
            if missing:
                raise ValueError(f"the saved adapter lacks {len(missing)} weights, e.g. {missing[0]}")
            model.set_adapter(name, inference_mode=True)
            yield model
        finally:
            if name in model.peft_config:
                model.set_adapter(trained)
                model.delete_adapter(name)
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, False))


def _tuner_layers(model: Any) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft tuner layer that computes a delta weight, outermost first."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight")]


def _delta_weight(layer: Any) -> Any:
    """Sum of the active, unmerged adapters' delta weights of a tuner layer (fp32), or None."""
    delta = None
    merged = set(getattr(layer, "merged_adapters", []) or [])
    for adapter in layer.active_adapters:
        if adapter in merged or adapter not in getattr(layer, "lora_A", {adapter: None}):
            continue
        d = layer.get_delta_weight(adapter).float()
        delta = d if delta is None else delta + d
    return delta


def _unwrapped_name(name: str) -> str:
    """A module name inside a peft model, as the wrapped transformers model names it."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _saved_num_labels(directory: Path) -> int | None:
    from safetensors import safe_open

    with contextlib.suppress(Exception):
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                    return int(handle.get_slice(key).get_shape()[0])
    return None


def _check_every_tensor_loaded(model: Any, directory: Path) -> None:
    """Every tensor of the saved adapter file must have found its place in the model."""
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    lost = sorted(saved - set(get_peft_model_state_dict(model).keys()))
    if lost:
        raise ExportError(
            f"the adapter in {directory} does not match the base model: {len(lost)} tensor(s) have no place in it (e.g. {lost[0]})"
        )


@hookimpl
def register_adapters(register):
    register(Lora)
