"""The memory planner behind ``qlora plan``: predicts what a QLoRA (or LoRA, or full) fine-tune
needs on the device and on the host before anything is loaded.

The method and its constants are documented in docs/memory.md. In short, for an architecture
(a named preset, a ``config.json`` or a checkpoint directory, whose safetensors headers are read
but no tensor) and a set of choices (quantizer, double quantization, model dtype, adapter, LoRA
rank, optimizer, batch, sequence length, gradient checkpointing, device):

- weights are counted exactly, layer by layer (packed 4-bit codes, per-block constants with or
  without double quantization, unquantized embeddings/norms/head in the model dtype);
- adapters, their gradients and the optimizer states follow from the trainable parameter count;
- activations use per-token, per-layer byte coefficients measured with saved-tensor hooks on
  transformers' Llama (sdpa attention) with peft LoRA (see :data:`ACTIVATION_BYTES`), plus the
  logits/loss tensors and one layer's transient dequantized weight;
- on a CPU, a few constants calibrated against peak RSS by ``benchmarks/plan_accuracy.py`` add
  the allocator's overhead (:data:`CPU`); on CUDA, a fixed context size is assumed (:data:`CUDA`).

Nothing here imports torch unless an architecture that is not Llama-like has to be inspected on
the meta device.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import attrs

from qlora_plugins.core.errors import ConfigError, ModelError, short_repr

GB = 10**9
GiB = 2**30

#: Public architecture numbers (the models' config.json files on the Hugging Face hub).
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       torch_dtype="float16"),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
                        torch_dtype="float16"),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                        torch_dtype="float16"),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                       torch_dtype="bfloat16"),
}

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

#: Quantizer -> number of fp32 per-block constants (0: not quantized).
QUANTIZERS = {"nf4": 1, "fp4": 1, "int4_sym": 1, "int4_asym": 2, "none": 0}

#: Optimizer -> (bytes of state per trainable parameter, where the states live).
OPTIMIZERS = {
    "adamw": (8.0, "device"),
    "paged_adamw": (8.0, "paged"),  # CUDA unified memory: on the device until it pages to the host
    "adamw_8bit": (2.0 + 8.0 / 256, "device"),  # two uint8 states + an fp32 absmax per 256
    "offload_adamw": (8.0, "host"),  # plus an fp32 host copy of the gradients (and params on CUDA)
}

#: Bytes saved for backward per token and per decoder layer, ``h * hidden + i * intermediate +
#: kv * (kv_heads * head_dim) + c``, by compute dtype and whether LoRA dropout is on. Measured with
#: ``torch.autograd.graph.saved_tensors_hooks`` on transformers 5 ``LlamaForCausalLM`` (sdpa) with
#: peft LoRA on every linear layer (QuantLinear and nn.Linear bases save the same): exact to a few
#: bytes per token on 12 shapes. Dropout doubles the adapters' inputs (mask + dropped copy).
ACTIVATION_BYTES = {
    ("float32", True): dict(h=64.0, i=20.0, kv=8.0, c=300.0),
    ("float32", False): dict(h=24.0, i=16.0, kv=8.0, c=300.0),
    ("bfloat16", True): dict(h=60.0, i=14.0, kv=4.0, c=265.0),
    ("bfloat16", False): dict(h=36.0, i=10.0, kv=4.0, c=265.0),
}

#: CPU constants, calibrated against measured peak RSS minus the import baseline by
#: ``benchmarks/plan_accuracy.py`` (see docs/memory.md for the fit and its residuals).
#: ``baseline``: RSS of a process that imported torch, transformers, peft and bitsandbytes.
#: ``fixed``: what a training process adds regardless of model size (autograd engine, OpenMP
#: pools, Python objects). ``transient``: multiplier on stored activations plus transient buffers
#: (the allocator's fragmentation and the backward pass's short-lived gradients come on top of
#: what autograd keeps; the excess appears in the "runtime + allocator overhead" row).
CPU = {"baseline": 460e6, "fixed": 32e6, "transient": 1.0, "logits_copies": 3.0}

#: Bytes per parameter the builtin formats' ``encode`` allocates on top of its input while
#: quantizing one weight (the codes included), by model-dtype bytes: measured with VmHWM on
#: 11.5M- and 70.8M-parameter weights, the same for nf4, fp4 and int4.
ENCODE_TEMPORARY_BYTES = {4: 7.0, 2: 5.0}

#: While loading, an unquantized tensor is read whole when small, else in row chunks of 32 MiB
#: (``streaming.COPY_CHUNK_BYTES``), and copied into its parameter with the dtype conversion.
LOAD_CHUNK_BYTES = 32 << 20

#: CUDA assumptions (not measurable on this project's CPU machines): the context plus cuBLAS
#: workspaces, and the caching allocator's slack on transient memory.
CUDA = {"context": 0.6e9, "transient": 1.2, "logits_copies": 3.0, "host_baseline": 1.5e9}


# --- architectures ------------------------------------------------------------------------


@attrs.define(frozen=True)
class LinearShape:
    """A group of ``count`` identical linear layers (e.g. every layer's ``q_proj``)."""

    name: str
    in_features: int
    out_features: int
    count: int = 1

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@attrs.define
class Architecture:
    """What the planner needs to know about a model."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: list[LinearShape]
    other_params: int
    checkpoint_dtype: Optional[str] = None
    checkpoint_bytes: Optional[int] = None
    largest_tensor: int = 0
    source: str = "preset"

    @property
    def linear_params(self) -> int:
        return sum(l.numel * l.count for l in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


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
            LinearShape("q_proj", hidden, q, layers), LinearShape("k_proj", hidden, kv, layers),
            LinearShape("v_proj", hidden, kv, layers), LinearShape("o_proj", q, hidden, layers),
            LinearShape("gate_proj", hidden, intermediate, layers), LinearShape("up_proj", hidden, intermediate, layers),
            LinearShape("down_proj", intermediate, hidden, layers),
        ]
        other = vocab * hidden * (1 if tied else 2) + (2 * layers + 1) * hidden
        largest = max(vocab * hidden, hidden * intermediate)
    else:
        linears, other, largest = _inspect_on_meta(config)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return Architecture(name, model_type, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied, linears, other,
                        checkpoint_dtype=dtype if dtype in DTYPE_BYTES else None, largest_tensor=largest, source=source)


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


def load_architecture(source: str) -> Architecture:
    """A preset name, a ``config.json`` file, or a checkpoint directory (config + safetensors
    headers; no tensor is read)."""
    key = source.strip().lower()
    if key in PRESETS:
        return architecture_from_config(PRESETS[key], key, "preset")
    path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path}: not a checkpoint directory (no config.json)")
    elif path.is_file():
        config_file = path
    else:
        from qlora_plugins.core.options import did_you_mean

        raise ModelError(f"{source}: not a preset, a config.json or a checkpoint directory{did_you_mean(key, PRESETS)}; "
                         f"presets: {', '.join(PRESETS)}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"{config_file}: not a readable JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a JSON object")
    arch = architecture_from_config(config, path.name if path.is_dir() else path.stem, "checkpoint" if path.is_dir() else "config")
    if path.is_dir():
        dtype, nbytes, largest = _safetensors_headers(path)
        if nbytes:
            arch.checkpoint_dtype, arch.checkpoint_bytes, arch.largest_tensor = dtype or arch.checkpoint_dtype, nbytes, largest
    return arch


# --- settings and the plan ----------------------------------------------------------------


@attrs.define
class Settings:
    """The choices a plan is made for."""

    quantizer: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dtype: str = "float32"
    adapter: str = "lora"
    lora_r: int = 16
    lora_dropout: float = 0.05
    targets: Optional[list[str]] = None  # None: all linear layers
    optimizer: str = "paged_adamw"
    batch: int = 1
    seq: int = 512
    gradient_checkpointing: bool = True
    device: str = "cuda"

    def __attrs_post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ConfigError("--quantizer", f"unknown quantizer '{self.quantizer}'; the planner knows {', '.join(QUANTIZERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("--optimizer", f"unknown optimizer '{self.optimizer}'; the planner knows {', '.join(OPTIMIZERS)}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError("--dtype", f"must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.adapter not in ("lora", "full"):
            raise ConfigError("--adapter", f"must be lora or full, got {self.adapter!r}")
        if self.adapter == "full" and self.quantizer != "none":
            raise ConfigError("--adapter", "full fine-tuning needs an unquantized base (--quantizer none)")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError("--device", f"must be cuda or cpu, got {self.device!r}")
        for option, value in (("--batch", self.batch), ("--seq", self.seq), ("--lora-r", self.lora_r)):
            if value < 1:  # each error names its own option
                raise ConfigError(option, f"must be at least 1, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("--lora-dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.blocksize < 32 or self.blocksize > 4096 or self.blocksize & (self.blocksize - 1):
            raise ConfigError("--blocksize", f"must be a power of two in [32, 4096], got {self.blocksize}")


def quantized_bytes(numel: int, quantizer: str, double_quant: bool, blocksize: int) -> tuple[int, int]:
    """(packed code bytes, constant bytes) of one quantized tensor, as our quantizers store it:
    two codes a byte; per block one fp32 constant per scale key, or with double quantization one
    uint8 code per block plus an fp32 absmax per 256 blocks and one fp32 offset."""
    keys = QUANTIZERS[quantizer]
    blocks = -(-numel // blocksize)
    if double_quant:
        constants = keys * (blocks + 4 * -(-blocks // 256) + 4)
    else:
        constants = keys * 4 * blocks
    return (numel + 1) // 2, constants


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


def _targets(arch: Architecture, settings: Settings) -> list[LinearShape]:
    if settings.targets is None:
        return arch.linears
    return [l for l in arch.linears if l.name in settings.targets]


def device_constants(settings: Settings, constants: Optional[dict] = None) -> dict:
    """:data:`CPU` or :data:`CUDA` for ``settings.device``, with ``constants`` overriding entries
    (the calibration in ``benchmarks/plan_accuracy.py`` uses this)."""
    return {**(CPU if settings.device == "cpu" else CUDA), **(constants or {})}


def activation_bytes(arch: Architecture, settings: Settings, checkpointing: bool, constants: Optional[dict] = None) -> dict:
    """Activation memory of one micro-batch: what is stored for backward, and the transient peak
    of the backward pass on top of it (the logits' gradients, or one recomputed layer)."""
    compute = "float32" if settings.dtype == "float32" else "bfloat16"
    dbytes = DTYPE_BYTES[settings.dtype]
    coef = ACTIVATION_BYTES[(compute, settings.lora_dropout > 0 and settings.adapter == "lora")]
    if settings.adapter == "full":
        coef = {**ACTIVATION_BYTES[(compute, False)], "h": ACTIVATION_BYTES[(compute, False)]["h"] + 7 * dbytes}
    tokens = settings.batch * settings.seq
    kv = arch.kv_heads * arch.head_dim
    per_layer = tokens * (coef["h"] * arch.hidden + coef["i"] * arch.intermediate + coef["kv"] * kv + coef["c"])
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


def make_plan(arch: Architecture, settings: Settings, constants: Optional[dict] = None) -> Plan:
    """Predict memory for ``arch`` trained with ``settings`` (``constants`` overrides entries of
    :data:`CPU` / :data:`CUDA`)."""
    s = settings
    dbytes = DTYPE_BYTES[s.dtype]
    cpu = s.device == "cpu"
    rows: list[Row] = []
    quantized = s.quantizer != "none"
    packed = const_bytes = 0
    if quantized:
        for lin in arch.linears:
            p, c = quantized_bytes(lin.numel, s.quantizer, s.double_quant, s.blocksize)
            packed += p * lin.count
            const_bytes += c * lin.count
        bits = 8 * (packed + const_bytes) / max(arch.linear_params, 1)
        label = f"base weights ({s.quantizer}{' + DQ' if s.double_quant else ''}, blocksize {s.blocksize})"
        rows.append(Row("base_weights", label, packed, note=f"{arch.linear_params / 1e9:.2f}B linear params, 4 bits"))
        rows.append(Row("quant_constants", "quantization constants", const_bytes, note=f"{bits:.3f} bits/param with constants"))
    else:
        rows.append(Row("base_weights", f"base weights ({s.dtype})", arch.linear_params * dbytes, note=f"{arch.linear_params / 1e9:.2f}B linear params"))
    rows.append(Row("other_weights", f"embeddings, norms, head ({s.dtype})", arch.other_params * dbytes,
                    note=f"{arch.other_params / 1e6:.0f}M params, not quantized"))

    if s.adapter == "full":
        trainable = arch.total_params
        rows.append(Row("adapters", "trainable weights (full fine-tuning)", 0, note="the base weights themselves"))
        grad_bytes = trainable * dbytes
    else:
        trainable = sum(s.lora_r * (l.in_features + l.out_features) * l.count for l in _targets(arch, s))
        rows.append(Row("adapters", f"LoRA adapters (r={s.lora_r}, fp32)", trainable * 4, note=f"{trainable / 1e6:.1f}M params"))
        grad_bytes = trainable * 4
    rows.append(Row("adapter_grads", "gradients of the trainable weights", grad_bytes))

    per_param, where = OPTIMIZERS[s.optimizer]
    states = trainable * per_param
    if cpu:
        rows.append(Row("optimizer", f"optimizer states ({s.optimizer})", host=states + (trainable * 4 if where == "host" else 0),
                        note="host memory (the device is the CPU)"))
    elif where == "host":
        extra = trainable * 4 * 2  # fp32 gradient and parameter copies on the host
        rows.append(Row("optimizer", f"optimizer states ({s.optimizer})", host=states + extra, note="on the host; steps there"))
    elif where == "paged":
        rows.append(Row("optimizer", f"optimizer states ({s.optimizer})", states, note="paged: moves to the host under pressure"))
    else:
        rows.append(Row("optimizer", f"optimizer states ({s.optimizer})", states))

    act_on = activation_bytes(arch, s, True, constants)
    act_off = activation_bytes(arch, s, False, constants)
    chosen = act_on if s.gradient_checkpointing else act_off
    consts = device_constants(s, constants)
    largest_linear = max((l.numel for l in arch.linears), default=0)
    dequant = largest_linear * dbytes if quantized else 0
    transient = chosen["transient"] + dequant
    rows.append(Row("activations", f"activations, stored (batch {s.batch} x {s.seq}, checkpointing {'on' if s.gradient_checkpointing else 'off'})",
                    chosen["stored"], note=f"{'off' if s.gradient_checkpointing else 'on'}: {(act_off if s.gradient_checkpointing else act_on)['stored'] / GB:.2f} GB"))
    rows.append(Row("transient", "transient peak (backward, logits, one dequantized layer)", transient))
    slack = (consts["transient"] - 1.0) * (chosen["stored"] + transient)
    if cpu:
        rows.append(Row("runtime", "runtime + allocator overhead (calibrated)", consts["fixed"] + slack,
                        note=f"{consts['fixed'] / 1e6:.0f} MB + {consts['transient'] - 1:.2f} x activations and transients"))
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
    one_linear = largest_linear * (ckpt_bytes + convert + ENCODE_TEMPORARY_BYTES[dbytes])
    one_copy = min((arch.largest_tensor or largest_linear) * ckpt_bytes, LOAD_CHUNK_BYTES)
    load_over = resident_weights + (max(one_linear, one_copy) if quantized else 0)
    totals = {
        "device_peak_bytes": 0.0 if cpu else device_total,
        "host_over_baseline_bytes": max(host_over, load_over),
        "host_baseline_bytes": baseline,
        "host_peak_bytes": baseline + max(host_over, load_over),
        "load_peak_over_baseline_bytes": load_over,
        "paged_bytes": states if (where == "paged" and not cpu) else 0.0,
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
    candidates: list[tuple[str, dict]] = []
    if not settings.gradient_checkpointing:
        candidates.append(("turn on gradient checkpointing", {"gradient_checkpointing": True}))
    if settings.quantizer == "none" and settings.adapter == "lora":
        candidates.append(("quantize the base with nf4 + double quantization", {"quantizer": "nf4", "double_quant": True}))
    if settings.quantizer != "none" and not settings.double_quant:
        candidates.append(("turn on double quantization", {"double_quant": True}))
    if settings.optimizer in ("adamw", "paged_adamw"):
        candidates.append(("use the 8-bit optimizer (adamw_8bit)", {"optimizer": "adamw_8bit"}))
    if settings.optimizer != "offload_adamw" and settings.device == "cuda":
        candidates.append(("offload the optimizer states to the host (offload_adamw)", {"optimizer": "offload_adamw"}))
    if settings.dtype == "float32":
        candidates.append(("compute in bfloat16 (model.dtype: bfloat16)", {"dtype": "bfloat16"}))

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
            f"{floor.totals['weights_bytes'] / GB:.1f} GB; it needs a larger device, a lower-bit quantizer or layer offloading")
    return result


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


def quantizer_table(arch: Architecture, blocksize: int = 64, dtype: str = "float32") -> list[dict]:
    """Weights of ``arch`` under every quantizer, with and without double quantization."""
    rows = []
    for name in QUANTIZERS:
        for dq in ((False,) if name == "none" else (False, True)):
            packed = const = 0
            for lin in arch.linears:
                if name == "none":
                    packed += lin.numel * lin.count * DTYPE_BYTES[dtype]
                else:
                    p, c = quantized_bytes(lin.numel, name, dq, blocksize)
                    packed, const = packed + p * lin.count, const + c * lin.count
            other = arch.other_params * DTYPE_BYTES[dtype]
            rows.append({"quantizer": name, "double_quant": dq, "codes_bytes": packed, "constants_bytes": const,
                         "bits_per_param": 8 * (packed + const) / max(arch.linear_params, 1), "unquantized_bytes": other,
                         "total_bytes": packed + const + other})
    return rows


def _gb(totals: dict) -> dict:
    return {k: (round(v / GB, 3) if isinstance(v, (int, float)) else v) for k, v in totals.items()}


def plan_dict(plan: Plan, budget: Optional[dict] = None) -> dict:
    """The plan as JSON-ready data (bytes, plus GB for reading)."""
    a, s = plan.arch, plan.settings
    return {
        "model": {"name": a.name, "source": a.source, "model_type": a.model_type, "params": a.total_params,
                  "linear_params": a.linear_params, "hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers,
                  "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab, "tied_embeddings": a.tied,
                  "checkpoint_dtype": a.checkpoint_dtype, "checkpoint_bytes": a.checkpoint_bytes},
        "settings": attrs.asdict(s),
        "trainable_params": plan.trainable_params,
        "rows": [{"component": r.key, "label": r.label, "device_bytes": r.device, "host_bytes": r.host, "note": r.note} for r in plan.rows],
        "activations": plan.activations,
        "totals": plan.totals,
        "totals_gb": _gb(plan.totals),
        "quantizers": quantizer_table(a, s.blocksize, s.dtype),
        "budget": budget,
    }


def format_plan(plan: Plan, budget: Optional[dict] = None, budgets: Optional[dict] = None) -> str:
    """The plan as text tables."""
    a, s = plan.arch, plan.settings
    fmt = lambda b: "-" if not b else f"{b / GB:8.2f} GB"  # noqa: E731
    lines = [f"qlora plan: {a.name} ({a.total_params / 1e9:.2f}B params, {a.model_type}; {a.source})",
             f"settings: quantizer={s.quantizer}{'+dq' if s.double_quant and s.quantizer != 'none' else ''} blocksize={s.blocksize} "
             f"dtype={s.dtype} adapter={s.adapter}{f' r={s.lora_r}' if s.adapter == 'lora' else ''} optimizer={s.optimizer} "
             f"batch={s.batch} seq={s.seq} checkpointing={'on' if s.gradient_checkpointing else 'off'} device={s.device}", ""]
    width = max(len(r.label) for r in plan.rows)
    head_dev = "device" if s.device == "cuda" else ""
    lines.append(f"{'component'.ljust(width)}  {head_dev:>11}  {'host':>11}  note")
    for r in plan.rows:
        lines.append(f"{r.label.ljust(width)}  {fmt(r.device) if s.device == 'cuda' else '':>11}  {fmt(r.host):>11}  {r.note}")
    t = plan.totals
    if s.device == "cuda":
        lines.append(f"{'total (device peak)'.ljust(width)}  {fmt(t['device_peak_bytes']):>11}")
    lines.append(f"{'host: runtime baseline'.ljust(width)}  {'':>11}  {fmt(t['host_baseline_bytes']):>11}")
    lines.append(f"{'total (host peak)'.ljust(width)}  {'':>11}  {fmt(t['host_peak_bytes']):>11}  "
                 f"loading: {t['load_peak_over_baseline_bytes'] / GB:.2f} GB over the baseline")
    on, off = plan.activations["checkpointing_on"], plan.activations["checkpointing_off"]
    lines += ["", f"activations at batch {s.batch} x {s.seq}: checkpointing on {on['peak'] / GB:.2f} GB "
                  f"(stored {on['stored'] / GB:.2f}), off {off['peak'] / GB:.2f} GB (stored {off['stored'] / GB:.2f})"]
    lines += ["", "base weights by quantizer (linear layers quantized; embeddings/norms/head in " + s.dtype + "):"]
    for row in quantizer_table(a, s.blocksize, s.dtype):
        name = row["quantizer"] + (" + DQ" if row["double_quant"] else "")
        lines.append(f"  {name:<16} {row['bits_per_param']:6.3f} bits/param  codes {fmt(row['codes_bytes'])}  "
                     f"constants {fmt(row['constants_bytes'])}  total with unquantized {fmt(row['total_bytes'])}")
    if budget is not None:
        lines.append("")
        where = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in (budgets or {}).items() if v is not None)
        if budget["fits"]:
            lines.append(f"fits ({where})")
        else:
            lines.append(f"does NOT fit ({where}): " + "; ".join(budget["problems"]))
            for sug in budget["suggestions"]:
                tot = sug["totals"]
                lines.append(f"  would fit: {sug['change']} -> device {tot['device_peak_bytes']:.2f} GB, host {tot['host_peak_bytes']:.2f} GB")
    return "\n".join(lines)
