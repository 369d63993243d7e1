"""The memory planner behind ``qlora plan``: predicts what a QLoRA (or LoRA, or full) fine-tune
needs on the device and on the host before anything is loaded.

The method and its constants are documented in docs/memory.md. In short, for an architecture
(a named preset, a ``config.json`` or a checkpoint directory, whose safetensors headers are read
but no tensor) and a set of choices (quantizer, double quantization, model dtype, adapter, LoRA
rank, optimizer, batch, sequence length, gradient checkpointing, device):

- weights are counted exactly, layer by layer (packed 4-bit codes, per-block constants with or
  without double quantization, unquantized embeddings/norms/head in the model dtype);
- adapters, their gradients and the optimizer states follow from the trainable parameter count;
- activations use per-token, per-layer byte coefficients the adapter declares (the builtins'
  were measured with saved-tensor hooks on transformers' Llama with peft LoRA), plus the
  logits/loss tensors and one layer's transient dequantized weight;
- on a CPU, a few constants calibrated against peak RSS by ``benchmarks/plan_accuracy.py`` add
  the allocator's overhead (:data:`CPU`); on CUDA, a fixed context size is assumed (:data:`CUDA`).

The planner knows no plugin by name: :class:`Settings` holds plugin *instances* (built from the
registry by name and options) and every plugin-specific figure comes from their declared
``planned_*`` methods (docs/plugins.md): the quantizer's storage of one weight, the adapter's
trainable parameters, weight and gradient bytes and activation coefficients, the optimizer's
state bytes. Suggestions ask the registry (its default quantizer, the other optimizers) and the
quantizer (its variants) rather than a table of names.

Nothing here imports torch unless an architecture that is not Llama-like has to be inspected on
the meta device.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs

from qlora_plugins.core import wording
from qlora_plugins.core.errors import ConfigError, ModelError, PluginError, short_repr
from qlora_plugins.core.interfaces import Adapter, Optimizer, Plugin, Quantizer
from qlora_plugins.core.options import build_options, options_to_dict
from qlora_plugins.core.planning import Architecture, LinearShape

__all__ = [
    "Architecture",
    "LinearShape",
    "Plan",
    "Row",
    "Settings",
    "check_budget",
    "format_plan",
    "load_architecture",
    "make_plan",
    "parse_size",
    "plan_dict",
    "quantizer_table",
]

GB = 10**9
GiB = 2**30

#: Public architecture numbers (the models' config.json files on the Hugging Face hub).
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        torch_dtype="float16",
    ),
    "llama-2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
        torch_dtype="float16",
    ),
    "llama-2-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        torch_dtype="float16",
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
}

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

#: CPU constants, calibrated against measured peak RSS minus the import baseline by
#: ``benchmarks/plan_accuracy.py`` (see docs/memory.md for the fit and its residuals).
#: ``baseline``: RSS of a process that imported torch, transformers, peft and bitsandbytes.
#: ``fixed``: what a training process adds regardless of model size (autograd engine, OpenMP
#: pools, Python objects). ``transient``: multiplier on stored activations plus transient buffers
#: (the allocator's fragmentation and the backward pass's short-lived gradients come on top of
#: what autograd keeps; the excess appears in the "runtime + allocator overhead" row).
CPU = {"baseline": 460e6, "fixed": 32e6, "transient": 1.0, "logits_copies": 3.0}

#: While loading, an unquantized tensor is read whole when small, else in row chunks of 32 MiB
#: (``streaming.COPY_CHUNK_BYTES``), and copied into its parameter with the dtype conversion.
LOAD_CHUNK_BYTES = 32 << 20

#: CUDA assumptions (not measurable on this project's CPU machines): the context plus cuBLAS
#: workspaces, and the caching allocator's slack on transient memory.
CUDA = {"context": 0.6e9, "transient": 1.2, "logits_copies": 3.0, "host_baseline": 1.5e9}


# --- architectures ------------------------------------------------------------------------


#: The strategy of a plain one-process run (``train.distributed: none``).
NO_DISTRIBUTION = "none"


def _get(config: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        return _get(text, *keys, default=default)
    return default


def architecture_from_config(config: dict, name: str = "model", source: str = "config") -> Architecture:
    """An :class:`Architecture` from a transformers ``config.json`` mapping.

    Llama-like models (llama, mistral, qwen2/3) are counted analytically; others are built on
    the meta device (no memory, no weights) and their linear layers enumerated.
    """
    model_type = str(config.get("model_type", ""))
    hidden = _get(config, "hidden_size", "n_embd", "d_model", "dim")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    if not (hidden and layers and heads):
        raise ConfigError("model", f"{name}: config has no hidden size / layer count / head count; cannot plan it")
    vocab = int(_get(config, "vocab_size", default=32000))
    intermediate = int(_get(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff", default=None) or 4 * hidden)
    kv_heads = int(_get(config, "num_key_value_heads", default=heads) or heads)
    head_dim = int(_get(config, "head_dim", default=None) or hidden // heads)
    tied = bool(_get(config, "tie_word_embeddings", default=model_type not in LLAMA_LIKE))
    hidden, layers, heads = int(hidden), int(layers), int(heads)
    if model_type in LLAMA_LIKE:
        q, kv = heads * head_dim, kv_heads * head_dim
        linears = [
            LinearShape("q_proj", hidden, q, layers),
            LinearShape("k_proj", hidden, kv, layers),
            LinearShape("v_proj", hidden, kv, layers),
            LinearShape("o_proj", q, hidden, layers),
            LinearShape("gate_proj", hidden, intermediate, layers),
            LinearShape("up_proj", hidden, intermediate, layers),
            LinearShape("down_proj", intermediate, hidden, layers),
        ]
        other = vocab * hidden * (1 if tied else 2) + (2 * layers + 1) * hidden
        largest = max(vocab * hidden, hidden * intermediate)
    else:
        linears, other, largest = _inspect_on_meta(config)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return Architecture(
        name,
        model_type,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        vocab,
        tied,
        linears,
        other,
        checkpoint_dtype=dtype if dtype in DTYPE_BYTES else None,
        largest_tensor=largest,
        source=source,
    )


def _inspect_on_meta(config: dict) -> tuple[list[LinearShape], int, int]:
    """Build the model on the meta device and count its linear layers (grouped by leaf name)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, is_skipped
    from qlora_plugins.core.streaming import linear_like_layers

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        except ValueError:
            model = AutoModel.from_config(cfg)
    groups: dict[tuple[str, int, int], int] = {}
    counted = set()
    for name, module in linear_like_layers(model, list(DEFAULT_SKIP_MODULES)).items():
        shape = tuple(module.weight.shape)
        out_f, in_f = (shape[0], shape[1]) if isinstance(module, torch.nn.Linear) else (shape[1], shape[0])
        key = (name.rsplit(".", 1)[-1], in_f, out_f)
        groups[key] = groups.get(key, 0) + 1
        counted.add(id(module.weight))
    other, largest, seen = 0, 0, set()
    for name, param in model.named_parameters():
        largest = max(largest, param.numel())
        if id(param) in counted or id(param) in seen:
            continue
        seen.add(id(param))
        if not is_skipped(name.rsplit(".", 1)[0], ()):
            other += param.numel()
    return [LinearShape(n, i, o, c) for (n, i, o), c in groups.items()], other, largest


def _safetensors_headers(directory: Path) -> tuple[Optional[str], int, int]:
    """(dominant float dtype, data bytes, largest tensor numel) from the checkpoint's headers."""
    from qlora_plugins.core.modeling import safetensors_files
    from qlora_plugins.core.streaming import tensor_locations

    by_dtype: dict[str, int] = {}
    total = largest = 0
    for file in safetensors_files(directory):
        for dtype, shape, start, stop in tensor_locations(file).values():
            total += stop - start
            largest = max(largest, math.prod(shape) if shape else 1)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + stop - start
    dominant = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return _ST_DTYPE.get(dominant or ""), total, largest


def load_architecture(source: str, revision: str | None = None) -> Architecture:
    """A preset name, a ``config.json`` file, a checkpoint directory (config + safetensors
    headers; no tensor is read), or a Hugging Face Hub id ``org/name`` (its cached config alone
    is enough: only config.json is downloaded when missing, nothing with ``HF_HUB_OFFLINE``)."""
    from qlora_plugins.core import hub

    if revision is not None and not hub.is_hub_id(source):
        raise ModelError(f"{wording.option('revision')}: applies to a Hugging Face Hub id only; {source} is not one")
    key = source.strip().lower()
    if key in PRESETS:
        return architecture_from_config(PRESETS[key], key, "preset")
    path = Path(source).expanduser()
    if hub.is_hub_id(source):
        path = hub.resolve(source, revision, weights=False, config_path="MODEL").path
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path}: not a checkpoint directory (no config.json)")
    elif path.is_file():
        config_file = path
    else:
        from qlora_plugins.core.options import did_you_mean

        raise ModelError(
            f"{source}: not a preset, a config.json or a checkpoint directory{did_you_mean(key, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"{config_file}: not a readable JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a JSON object")
    label = source if hub.is_hub_id(source) else (path.name if path.is_dir() else path.stem)
    arch = architecture_from_config(config, label, "checkpoint" if path.is_dir() else "config")
    if path.is_dir():
        dtype, nbytes, largest = _safetensors_headers(path)
        if nbytes:
            arch.checkpoint_dtype, arch.checkpoint_bytes, arch.largest_tensor = dtype or arch.checkpoint_dtype, nbytes, largest
    return arch


# --- settings and the plan ----------------------------------------------------------------


#: The option that names each plugin kind the planner asks (errors name the option; the CLI spells it as a flag).
KIND_OPTIONS = {"quantizer": wording.option("quantizer"), "adapter": wording.option("adapter"), "optimizer": wording.option("optimizer")}


def _declared(option: str, plugin: Plugin, method: str, *args: Any) -> Any:
    """Call a ``planned_*`` method; a plugin that does not declare it is refused on one line."""
    try:
        return getattr(plugin, method)(*args)
    except NotImplementedError:
        raise ConfigError(
            option, f"{plugin.kind} '{plugin.name}' does not declare {method}(), so the planner cannot plan it (see docs/plugins.md)"
        ) from None


def _keeps_full_precision(quantizer: Quantizer) -> bool:
    return _declared(wording.option("quantizer"), quantizer, "planned_bytes", 64) is None


@attrs.define
class Settings:
    """The choices a plan is made for: plugin instances (with their options) and the run's
    shape. Build one from names with :meth:`from_names`.

    :param registry: where the planner finds alternatives to suggest and the quantizers of its
        comparison table.
    """

    quantizer: Quantizer
    adapter: Adapter
    optimizer: Optimizer
    registry: Any = attrs.field(eq=False, repr=False)
    dtype: str = "float32"
    batch: int = 1
    seq: int = 512
    gradient_checkpointing: bool = True
    device: str = "cuda"
    world_size: int = 1
    strategy: str = NO_DISTRIBUTION

    def __attrs_post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(wording.option("world_size"), f"must be at least 1, got {self.world_size}")
        if self.strategy not in (NO_DISTRIBUTION, "ddp", "fsdp"):
            raise ConfigError(wording.option("strategy"), f"must be ddp or fsdp, got {self.strategy!r}")
        if self.world_size > 1 and self.strategy == NO_DISTRIBUTION:
            self.strategy = "ddp"
        if self.strategy == "fsdp" and not getattr(self.optimizer, "shardable", False):
            raise ConfigError(
                wording.option("optimizer"),
                f"'{self.optimizer.name}' cannot update FSDP-sharded parameters; plan {wording.option('optimizer')} adamw",
            )
        if self.batch % self.world_size:
            raise ConfigError(
                wording.option("batch"),
                f"{self.batch} (the global micro-batch) does not divide across {wording.option('world_size')} {self.world_size}",
            )
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(wording.option("dtype"), f"must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(wording.option("device"), f"must be cuda or cpu, got {self.device!r}")
        for option, value in ((wording.option("batch"), self.batch), (wording.option("seq"), self.seq)):
            if value < 1:  # each error names its own option
                raise ConfigError(option, f"must be at least 1, got {value}")
        full_precision = _keeps_full_precision(self.quantizer)
        probe = [LinearShape("probe", 64, 64)]
        _declared(wording.option("adapter"), self.adapter, "planned_trainable", probe, _probe_arch(probe))
        _declared(wording.option("adapter"), self.adapter, "planned_activations", "float32", 4)
        _declared(wording.option("optimizer"), self.optimizer, "planned_state_bytes", 1, self.device)
        if self.adapter.needs_full_precision_base and not full_precision:
            keep = [n for n in _names_in_order(self.registry, "quantizer") if _quantizes_nothing(self.registry, n)]
            hint = f" ({wording.option('quantizer')} {keep[0]})" if keep else ""
            raise ConfigError(
                wording.option("adapter"), f"adapter '{self.adapter.name}' trains the base weights and needs an unquantized base{hint}"
            )

    @classmethod
    def from_names(
        cls,
        registry: Any,
        *,
        quantizer: Optional[str] = None,
        quantizer_options: Optional[Mapping] = None,
        adapter: Optional[str] = None,
        adapter_options: Optional[Mapping] = None,
        optimizer: Optional[str] = None,
        optimizer_options: Optional[Mapping] = None,
        **fields: Any,
    ) -> "Settings":
        """Settings with plugins built from ``registry`` by name (None: the kind's default) and
        options. ``fields`` are the other :class:`Settings` fields (dtype, batch, ...).

        :raises ConfigError: ``--quantizer: unknown quantizer 'x' (did you mean ...)`` and the
            like for names; ``quantizer.blocksize: ...`` (the kind, then the key) for options.
        """
        plugins = {
            kind: build_plugin(registry, kind, name, options)
            for kind, name, options in (
                ("quantizer", quantizer, quantizer_options),
                ("adapter", adapter, adapter_options),
                ("optimizer", optimizer, optimizer_options),
            )
        }
        return cls(registry=registry, **plugins, **fields)


def build_plugin(registry: Any, kind: str, name: Optional[str], options: Optional[Mapping] = None) -> Plugin:
    """The ``kind`` plugin ``name`` (None: the registry's default of the kind) with ``options``,
    errors naming the planner's option (``--quantizer``) or the option key (``quantizer.r``)."""
    option = KIND_OPTIONS.get(kind, wording.option(kind))
    if name is None:
        name = registry.default(kind)
        if name is None:
            raise ConfigError(
                option,
                f"no plugin declares itself the default {kind}; name one "
                f"(available: {', '.join(_names_in_order(registry, kind)) or 'none'})",
            )
    try:
        plugin_class = registry.get(kind, name)
    except PluginError as exc:
        raise ConfigError(option, str(exc)) from None
    return plugin_class(build_options(plugin_class.Options, dict(options or {}), kind))


def _names_in_order(registry: Any, kind: str) -> list[str]:
    return [r.name for r in registry.in_order(kind)]


def _quantizes_nothing(registry: Any, name: str) -> bool:
    try:
        return registry.create("quantizer", name).planned_bytes(64) is None
    except Exception:  # noqa: BLE001 - a quantizer that cannot say is not one to suggest
        return False


def _probe_arch(layers: list[LinearShape]) -> Architecture:
    return Architecture("probe", "probe", 64, 64, 1, 1, 1, 64, 64, True, layers, 0)


def _carried(plugin_class: type, options: Any) -> Optional[Plugin]:
    """An instance of ``plugin_class`` with the option values of ``options`` that it also has
    (same key), the rest at their defaults; None when those options do not build."""
    fields = {f.alias or f.name for f in attrs.fields(plugin_class.Options) if f.init}
    given = {k: v for k, v in options_to_dict(options).items() if k in fields}
    try:
        return plugin_class(build_options(plugin_class.Options, given, ""))
    except Exception:  # noqa: BLE001 - the other plugin's own validators disagree: skip it
        return None


def weight_bytes(arch: Architecture, quantizer: Quantizer) -> Optional[tuple[int, int]]:
    """(packed bytes, constant bytes) of every linear weight of ``arch`` as ``quantizer``
    stores them, or None when it keeps them in full precision."""
    packed = const = 0
    for lin in arch.linears:
        stored = quantizer.planned_bytes(lin.numel)
        if stored is None:
            return None
        packed, const = packed + stored[0] * lin.count, const + stored[1] * lin.count
    return packed, const


@attrs.define
class Row:
    """One line of the plan: bytes on the device and on the host."""

    key: str
    label: str
    device: float = 0.0
    host: float = 0.0
    note: str = ""


@attrs.define
class Plan:
    """A prediction: rows, activations with and without checkpointing, totals."""

    arch: Architecture
    settings: Settings
    rows: list[Row]
    activations: dict
    totals: dict
    trainable_params: int


def device_constants(settings: Settings, constants: Optional[dict] = None) -> dict:
    """:data:`CPU` or :data:`CUDA` for ``settings.device``, with ``constants`` overriding entries
    (the calibration in ``benchmarks/plan_accuracy.py`` uses this)."""
    return {**(CPU if settings.device == "cpu" else CUDA), **(constants or {})}


def activation_bytes(arch: Architecture, settings: Settings, checkpointing: bool, constants: Optional[dict] = None) -> dict:
    """Activation memory of one micro-batch: what is stored for backward, and the transient peak
    of the backward pass on top of it (the logits' gradients, or one recomputed layer)."""
    compute = "float32" if settings.dtype == "float32" else "bfloat16"
    dbytes = DTYPE_BYTES[settings.dtype]
    coef = _declared(wording.option("adapter"), settings.adapter, "planned_activations", compute, dbytes)
    tokens = settings.batch // settings.world_size * settings.seq  # one rank's share of the micro-batch
    kv = arch.kv_heads * arch.head_dim
    per_layer = tokens * (coef.h * arch.hidden + coef.i * arch.intermediate + coef.kv * kv + coef.c)
    head = tokens * (4 * arch.vocab + 4 * arch.hidden)  # fp32 log-softmax of the loss + final norm
    consts = device_constants(settings, constants)
    logits = consts["logits_copies"] * tokens * arch.vocab * 4  # logits, their fp32 copy and gradient
    if checkpointing:
        stored = arch.layers * tokens * dbytes * arch.hidden + head
        transient = max(per_layer, logits)
    else:
        stored = arch.layers * per_layer + head
        transient = logits
    return {"stored": stored, "transient": transient, "peak": stored + transient}


#: Rows FSDP divides across the ranks (each keeps ~1/N of them).
SHARDED_ROWS = ("base_weights", "quant_constants", "other_weights", "adapters", "adapter_grads", "optimizer")


def _distribute_rows(rows: list, arch: Architecture, s: Settings, grad_bytes: float) -> None:
    """Per-rank rows of a distributed run: FSDP divides the weights, gradients and optimizer
    states by the world size and adds the gathered blocks (the one computing and the next one,
    prefetched); DDP keeps everything whole and adds its gradient buckets."""
    n = s.world_size
    if n <= 1 or s.strategy == NO_DISTRIBUTION:
        return
    if s.strategy == "fsdp":
        block = sum(r.device + r.host for r in rows if r.key in ("base_weights", "quant_constants")) / max(arch.layers, 1)
        root = sum(r.device + r.host for r in rows if r.key == "other_weights")  # the root group: embeddings, norms, head
        for row in rows:
            if row.key in SHARDED_ROWS:
                row.device, row.host = row.device / n, row.host / n
                row.note = (row.note + "; " if row.note else "") + f"1/{n} per rank (FSDP)"
        rows.append(
            Row(
                "fsdp_gathered",
                "FSDP all-gathered: the root (embeddings, head) + 2 blocks",
                2 * (root + 2 * block),
                note="the all-gather buffer and the unsharded copy of each (measured on CPU); blocks are packed bytes",
            )
        )
    else:
        rows.append(Row("ddp_buckets", "DDP gradient buckets (a copy of the gradients)", grad_bytes))


def make_plan(arch: Architecture, settings: Settings, constants: Optional[dict] = None) -> Plan:
    """Predict memory for ``arch`` trained with ``settings`` (``constants`` overrides entries of
    :data:`CPU` / :data:`CUDA`)."""
    s = settings
    q, a, o = s.quantizer, s.adapter, s.optimizer
    dbytes = DTYPE_BYTES[s.dtype]
    cpu = s.device == "cpu"
    rows: list[Row] = []
    stored = None if _keeps_full_precision(q) else weight_bytes(arch, q)
    quantized = stored is not None
    if stored is not None:
        packed, const_bytes = stored
        bits = 8 * (packed + const_bytes) / max(arch.linear_params, 1)
        code_bits = 8 * packed / max(arch.linear_params, 1)
        rows.append(
            Row(
                "base_weights",
                f"base weights ({q.planned_label()})",
                packed,
                note=f"{arch.linear_params / 1e9:.2f}B linear params, {round(code_bits, 2):g} bits",
            )
        )
        rows.append(Row("quant_constants", "quantization constants", const_bytes, note=f"{bits:.3f} bits/param with constants"))
    else:
        rows.append(
            Row(
                "base_weights",
                f"base weights ({s.dtype})",
                arch.linear_params * dbytes,
                note=f"{arch.linear_params / 1e9:.2f}B linear params",
            )
        )
    rows.append(
        Row(
            "other_weights",
            f"embeddings, norms, head ({s.dtype})",
            arch.other_params * dbytes,
            note=f"{arch.other_params / 1e6:.0f}M params, not quantized",
        )
    )

    trainable = _declared(wording.option("adapter"), a, "planned_trainable", arch.linears, arch)
    adapter_bytes, grad_bytes = a.planned_weight_bytes(trainable, dbytes)
    rows.append(
        Row(
            "adapters",
            a.planned_label(),
            adapter_bytes,
            note=f"{trainable / 1e6:.1f}M params" if adapter_bytes else "the base weights themselves",
        )
    )
    rows.append(Row("adapter_grads", "gradients of the trainable weights", grad_bytes))

    states = _declared(wording.option("optimizer"), o, "planned_state_bytes", trainable, s.device)
    if cpu:
        rows.append(
            Row(
                "optimizer",
                f"optimizer states ({o.name})",
                host=states.device_bytes + states.host_bytes,
                note="host memory (the device is the CPU)",
            )
        )
    else:
        rows.append(Row("optimizer", f"optimizer states ({o.name})", states.device_bytes, states.host_bytes, note=states.note))

    full_weights = sum(r.device + r.host for r in rows if r.key in ("base_weights", "quant_constants", "other_weights"))
    _distribute_rows(rows, arch, s, grad_bytes)

    act_on = activation_bytes(arch, s, True, constants)
    act_off = activation_bytes(arch, s, False, constants)
    chosen = act_on if s.gradient_checkpointing else act_off
    consts = device_constants(s, constants)
    largest_linear = max((l.numel for l in arch.linears), default=0)
    dequant = largest_linear * dbytes if quantized else 0
    transient = chosen["transient"] + dequant
    rows.append(
        Row(
            "activations",
            f"activations, stored (batch {s.batch} x {s.seq}, checkpointing {'on' if s.gradient_checkpointing else 'off'})",
            chosen["stored"],
            note=f"{'off' if s.gradient_checkpointing else 'on'}: {(act_off if s.gradient_checkpointing else act_on)['stored'] / GB:.2f} GB",
        )
    )
    rows.append(Row("transient", "transient peak (backward, logits, one dequantized layer)", transient))
    slack = (consts["transient"] - 1.0) * (chosen["stored"] + transient)
    if cpu:
        rows.append(
            Row(
                "runtime",
                "runtime + allocator overhead (calibrated)",
                consts["fixed"] + slack,
                note=f"{consts['fixed'] / 1e6:.0f} MB + {consts['transient'] - 1:.2f} x activations and transients",
            )
        )
        for row in rows:  # on a CPU the device is the host
            row.host, row.device = row.host + row.device, 0.0
        baseline = consts["baseline"]
    else:
        rows.append(Row("runtime", "CUDA context, workspaces, allocator slack (assumed)", consts["context"] + slack))
        baseline = consts["host_baseline"]

    device_total = sum(r.device for r in rows)
    host_over = sum(r.host for r in rows)
    # loading: quantize-while-loading holds the model built so far plus one linear weight as read
    # from the checkpoint, its conversion to the model dtype (when the dtypes differ) and the
    # quantizer's temporaries; unquantized tensors are copied in chunks (streaming.COPY_CHUNK_BYTES)
    # (our loader builds the model on the host and moves it to the device at the end)
    ckpt_dtype = arch.checkpoint_dtype or s.dtype
    ckpt_bytes = DTYPE_BYTES.get(ckpt_dtype, dbytes)
    convert = dbytes if ckpt_dtype != s.dtype else 0
    resident_weights = sum(r.device + r.host for r in rows if r.key in ("base_weights", "quant_constants", "other_weights"))
    # every rank loads the whole model before FSDP shards it (core/fsdp.py)
    loaded_weights = max(resident_weights, full_weights)
    one_linear = largest_linear * (ckpt_bytes + convert) + q.planned_encode_bytes(largest_linear, dbytes)
    one_copy = min((arch.largest_tensor or largest_linear) * ckpt_bytes, LOAD_CHUNK_BYTES)
    load_over = loaded_weights + (max(one_linear, one_copy) if quantized else 0)
    totals = {
        "device_peak_bytes": 0.0 if cpu else device_total,
        "host_over_baseline_bytes": max(host_over, load_over),
        "host_baseline_bytes": baseline,
        "host_peak_bytes": baseline + max(host_over, load_over),
        "load_peak_over_baseline_bytes": load_over,
        "paged_bytes": states.device_bytes if (states.pageable and not cpu) else 0.0,
        "weights_bytes": resident_weights,
        "checkpoint_bytes": arch.checkpoint_bytes,
    }
    activations = {"checkpointing_on": act_on, "checkpointing_off": act_off}
    return Plan(arch, s, rows, activations, totals, trainable)


# --- fitting a budget ---------------------------------------------------------------------


def parse_size(text: str) -> float:
    """``24GB`` (10^9), ``24GiB`` (2^30), ``512MB``, ``64G`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"not a size: {short_repr(text)} (examples: 24GB, 24GiB, 512MB)")
    value, prefix, binary = match.groups()
    power = " kmgt".index(prefix) if prefix else 0
    size = float(value) * (1024 if binary else 1000) ** power
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"must be a positive size, got {short_repr(text)} (examples: 24GB, 24GiB, 512MB)")
    return size


def _fits(plan: Plan, device_budget: Optional[float], host_budget: Optional[float]) -> tuple[bool, list[str]]:
    """Whether ``plan`` fits; paged optimizer states may move to the host when the device is short."""
    problems = []
    t = plan.totals
    device, host = t["device_peak_bytes"], t["host_peak_bytes"]
    if plan.settings.device == "cpu":
        host_budget = host_budget if host_budget is not None else device_budget
    elif device_budget is not None and device > device_budget:
        spill = min(t["paged_bytes"], device - device_budget)
        if device - spill > device_budget:
            problems.append(f"device needs {device / GB:.2f} GB, budget {device_budget / GB:.2f} GB")
        host += spill
    if host_budget is not None and host > host_budget:
        problems.append(f"host needs {host / GB:.2f} GB, budget {host_budget / GB:.2f} GB")
    return not problems, problems


def check_budget(arch: Architecture, settings: Settings, device_budget: Optional[float], host_budget: Optional[float]) -> dict:
    """Whether ``settings`` fits the budgets and, if not, which changes would make it fit: each
    single change that is enough on its own, then the largest batch (or sequence length) that
    fits as it is or with the fewest memory-saving changes."""
    plan = make_plan(arch, settings)
    ok, problems = _fits(plan, device_budget, host_budget)
    result: dict = {"fits": ok, "problems": problems, "suggestions": []}
    if ok:
        return result
    candidates = _candidates(arch, settings, plan)

    def suggest(label: str, change: dict) -> None:
        trial = make_plan(arch, attrs.evolve(settings, **change))
        result["suggestions"].append({"change": label, "settings": change, "totals": _gb(trial.totals)})

    for label, change in candidates:
        if _fits(make_plan(arch, attrs.evolve(settings, **change)), device_budget, host_budget)[0]:
            suggest(label, change)
    # then the largest batch (or sequence length) that fits: as it is, or with the fewest of the
    # changes above (added in order; a later change of the same setting replaces an earlier one)
    steps: list[tuple[str, dict]] = [("", {})]
    for label, change in candidates:
        steps.append((label, {**steps[-1][1], **change}))
    order = [label for label, _ in candidates]

    def with_labels(i: int) -> list[str]:
        latest: dict[str, str] = {}
        for j in range(i):
            for key in candidates[j][1]:
                latest[key] = candidates[j][0]
        return sorted(set(latest.values()), key=order.index)

    found = False
    for field, name in (("batch", "batch size"), ("seq", "sequence length")):
        for i, (_, combined) in enumerate(steps):
            value = _largest_fitting(arch, attrs.evolve(settings, **combined), field, device_budget, host_budget)
            if value and value < getattr(settings, field):
                changes = with_labels(i)
                suggest(f"{name} {value}" + (f" with {' + '.join(changes)}" if changes else ""), {**combined, field: value})
            if value:
                found = True
                break
        if found:
            break
    combined = steps[-1][1]
    all_changes = " + ".join(with_labels(len(candidates)))
    if not result["suggestions"]:
        floor = make_plan(arch, attrs.evolve(settings, **combined, batch=1, seq=min(settings.seq, 128)))
        need = floor.totals["device_peak_bytes"] if settings.device == "cuda" else floor.totals["host_peak_bytes"]
        result["problems"].append(
            f"nothing the planner can change fits: even batch 1 x {min(settings.seq, 128)}"
            f"{' with ' + all_changes if all_changes else ''} needs {need / GB:.1f} GB, of which the weights are "
            f"{floor.totals['weights_bytes'] / GB:.1f} GB; it needs a larger device, a lower-bit quantizer or layer offloading"
        )
    return result


def _candidates(arch: Architecture, settings: Settings, plan: Plan) -> list[tuple[str, dict]]:
    """Single changes that save memory, in order: gradient checkpointing; a quantized base (the
    registry's default quantizer when the base is in full precision and the adapter allows it,
    else a variant of the quantizer that stores fewer bytes); each other registered optimizer
    whose states take less of the device (of the host, on a CPU); bfloat16 compute."""
    registry = settings.registry
    candidates: list[tuple[str, dict]] = []
    if not settings.gradient_checkpointing:
        candidates.append(("turn on gradient checkpointing", {"gradient_checkpointing": True}))
    current = None if _keeps_full_precision(settings.quantizer) else weight_bytes(arch, settings.quantizer)
    if current is None:
        default = registry.default("quantizer") if registry is not None else None
        if default is not None and not settings.adapter.needs_full_precision_base:
            quantizer = _quietly(lambda: registry.create("quantizer", default))
            if quantizer is not None and _quietly(lambda: weight_bytes(arch, quantizer)) is not None:
                candidates.append((f"quantize the base with {quantizer.planned_label()}", {"quantizer": quantizer}))
    else:
        for label, variant in settings.quantizer.planned_variants():
            smaller = _quietly(lambda: weight_bytes(arch, variant))
            if smaller is not None and sum(smaller) < sum(current):
                candidates.append((f"quantize the base with {label}", {"quantizer": variant}))
    if registry is not None:
        where = (lambda b: b.device_bytes + b.host_bytes) if settings.device == "cpu" else (lambda b: b.device_bytes)
        now = where(settings.optimizer.planned_state_bytes(plan.trainable_params, settings.device))
        for registration in registry.in_order("optimizer"):
            if registration.name == settings.optimizer.name:
                continue
            other = _carried(registration.cls, settings.optimizer.options)
            states = _quietly(lambda: other.planned_state_bytes(plan.trainable_params, settings.device)) if other else None
            if states is not None and where(states) < now:
                candidates.append((f"use the {registration.name} optimizer", {"optimizer": other}))
    if settings.dtype == "float32":
        candidates.append(("compute in bfloat16 (model.dtype: bfloat16)", {"dtype": "bfloat16"}))
    return candidates


def _quietly(call: Any) -> Any:
    """``call()``, or None when the plugin cannot answer (it declares no ``planned_*`` method, or
    raises): such a plugin is not suggested."""
    try:
        return call()
    except Exception:  # noqa: BLE001 - a plugin's own failure must not break the plan
        return None


def _largest_fitting(arch: Architecture, settings: Settings, field: str, device_budget, host_budget) -> int:
    """The largest value of ``field`` (batch or seq) up to the current one that fits (0: none)."""
    lo, hi = 0, getattr(settings, field)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(make_plan(arch, attrs.evolve(settings, **{field: mid})), device_budget, host_budget)[0]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- tables -------------------------------------------------------------------------------


def quantizer_table(arch: Architecture, settings: Settings) -> list[dict]:
    """Weights of ``arch`` under every registered quantizer that declares
    :meth:`~qlora_plugins.core.interfaces.Quantizer.planned_bytes`, in registration order, each in
    its :meth:`~qlora_plugins.core.interfaces.Quantizer.planned_variants` (the builtin blockwise
    formats: with and without double quantization), with the option values it shares with the
    plan's quantizer (e.g. the blocksize) and unquantized weights in the plan's dtype."""
    dbytes = DTYPE_BYTES[settings.dtype]
    other = arch.other_params * dbytes
    rows = []
    registrations = settings.registry.in_order("quantizer") if settings.registry is not None else []
    for registration in registrations:
        if registration.name == settings.quantizer.name:
            base = settings.quantizer
        else:
            base = _carried(registration.cls, settings.quantizer.options)
        variants = _quietly(base.planned_variants) if base is not None else None
        for label, variant in variants or ():
            try:
                stored = None if variant.planned_bytes(64) is None else weight_bytes(arch, variant)
            except Exception:  # noqa: BLE001 - undeclared (or failing): not in the table
                continue
            packed, const = stored if stored is not None else (arch.linear_params * dbytes, 0)
            options = options_to_dict(variant.options)
            rows.append(
                {
                    "quantizer": registration.name,
                    "label": label,
                    "options": options,
                    "double_quant": bool(options.get("double_quant", False)),
                    "codes_bytes": packed,
                    "constants_bytes": const,
                    "bits_per_param": 8 * (packed + const) / max(arch.linear_params, 1),
                    "unquantized_bytes": other,
                    "total_bytes": packed + const + other,
                }
            )
    return rows


def _gb(totals: dict) -> dict:
    return {k: (round(v / GB, 3) if isinstance(v, (int, float)) else v) for k, v in totals.items()}


def settings_dict(settings: Settings) -> dict:
    """The settings as JSON-ready data: each plugin's name and options, then the other fields."""
    out: dict[str, Any] = {}
    for kind in ("quantizer", "adapter", "optimizer"):
        plugin = getattr(settings, kind)
        out[kind], out[f"{kind}_options"] = plugin.name, options_to_dict(plugin.options)
    for field in ("dtype", "batch", "seq", "gradient_checkpointing", "device", "world_size", "strategy"):
        out[field] = getattr(settings, field)
    return out


def _change_json(change: dict) -> dict:
    """A suggestion's change as JSON-ready data (a plugin as its name and ``<kind>_options``,
    like :func:`settings_dict`)."""
    out: dict[str, Any] = {}
    for key, value in change.items():
        if isinstance(value, Plugin):
            out[key], out[f"{key}_options"] = value.name, options_to_dict(value.options)
        else:
            out[key] = value
    return out


def plan_dict(plan: Plan, budget: Optional[dict] = None) -> dict:
    """The plan as JSON-ready data (bytes, plus GB for reading)."""
    a, s = plan.arch, plan.settings
    if budget is not None:
        budget = {**budget, "suggestions": [{**sug, "settings": _change_json(sug["settings"])} for sug in budget["suggestions"]]}
    return {
        "model": {
            "name": a.name,
            "source": a.source,
            "model_type": a.model_type,
            "params": a.total_params,
            "linear_params": a.linear_params,
            "hidden": a.hidden,
            "intermediate": a.intermediate,
            "layers": a.layers,
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "vocab": a.vocab,
            "tied_embeddings": a.tied,
            "checkpoint_dtype": a.checkpoint_dtype,
            "checkpoint_bytes": a.checkpoint_bytes,
        },
        "settings": settings_dict(s),
        "trainable_params": plan.trainable_params,
        "rows": [{"component": r.key, "label": r.label, "device_bytes": r.device, "host_bytes": r.host, "note": r.note} for r in plan.rows],
        "activations": plan.activations,
        "totals": plan.totals,
        "totals_gb": _gb(plan.totals),
        "quantizers": quantizer_table(a, s),
        "budget": budget,
    }


def format_plan(plan: Plan, budget: Optional[dict] = None, budgets: Optional[dict] = None) -> str:
    """The plan as text tables."""
    a, s = plan.arch, plan.settings
    fmt = lambda b: "-" if not b else f"{b / GB:8.2f} GB"  # noqa: E731
    lines = [
        f"qlora plan: {a.name} ({a.total_params / 1e9:.2f}B params, {a.model_type}; {a.source})",
        f"settings: quantizer {s.quantizer.planned_label()}; adapter {s.adapter.planned_label()}; optimizer {s.optimizer.name}; "
        f"dtype={s.dtype} batch={s.batch} seq={s.seq} checkpointing={'on' if s.gradient_checkpointing else 'off'} device={s.device}"
        + (f" world_size={s.world_size} strategy={s.strategy} (figures per rank)" if s.world_size > 1 else ""),
        "",
    ]
    width = max(len(r.label) for r in plan.rows)
    head_dev = "device" if s.device == "cuda" else ""
    lines.append(f"{'component'.ljust(width)}  {head_dev:>11}  {'host':>11}  note")
    for r in plan.rows:
        lines.append(f"{r.label.ljust(width)}  {fmt(r.device) if s.device == 'cuda' else '':>11}  {fmt(r.host):>11}  {r.note}")
    t = plan.totals
    if s.device == "cuda":
        lines.append(f"{'total (device peak)'.ljust(width)}  {fmt(t['device_peak_bytes']):>11}")
    lines.append(f"{'host: runtime baseline'.ljust(width)}  {'':>11}  {fmt(t['host_baseline_bytes']):>11}")
    lines.append(
        f"{'total (host peak)'.ljust(width)}  {'':>11}  {fmt(t['host_peak_bytes']):>11}  "
        f"loading: {t['load_peak_over_baseline_bytes'] / GB:.2f} GB over the baseline"
    )
    on, off = plan.activations["checkpointing_on"], plan.activations["checkpointing_off"]
    lines += [
        "",
        f"activations at batch {s.batch} x {s.seq}: checkpointing on {on['peak'] / GB:.2f} GB "
        f"(stored {on['stored'] / GB:.2f}), off {off['peak'] / GB:.2f} GB (stored {off['stored'] / GB:.2f})",
    ]
    lines += ["", "base weights by quantizer (linear layers quantized; embeddings/norms/head in " + s.dtype + "):"]
    for row in quantizer_table(a, s):
        lines.append(
            f"  {row['label']:<16} {row['bits_per_param']:6.3f} bits/param  codes {fmt(row['codes_bytes'])}  "
            f"constants {fmt(row['constants_bytes'])}  total with unquantized {fmt(row['total_bytes'])}"
        )
    if budget is not None:
        lines.append("")
        where = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in (budgets or {}).items() if v is not None)
        if budget["fits"]:
            lines.append(f"fits ({where})")
        else:
            lines.append(f"does NOT fit ({where}): " + "; ".join(budget["problems"]))
            for sug in budget["suggestions"]:
                tot = sug["totals"]
                lines.append(
                    f"  would fit: {sug['change']} -> device {tot['device_peak_bytes']:.2f} GB, host {tot['host_peak_bytes']:.2f} GB"
                )
    return "\n".join(lines)
