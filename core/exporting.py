"""Running exporters, verifying what they wrote, and loading a finished run back for ``qlora export``.

For each exporter, :func:`run_exports`:

1. runs ``exporter.export(context, tmp)`` into an empty temporary sibling of the final directory;
2. checks the files: no links, nothing that pickles (``.bin``, ``.pt``, ``.pkl`` ...), no
   ``manifest.json`` of the exporter's own;
3. measures fidelity: reloads the artifact *from disk* (``exporter.reload`` if the exporter has
   one, else by what the directory holds: a PEFT adapter is attached to a freshly loaded base
   through the run's quantizer and adapter plugins, a checkpoint directory is loaded with
   :func:`~qlora_plugins.core.checkpoint_format.load_checkpoint`) and compares its logits with the
   trained model's on a probe batch: max and mean absolute logit difference, KL divergence and
   top-1 agreement; ``exporter.verify`` may add figures of its own (e.g. tensor-level errors);
4. checks the figures against the tolerance (the exporter's defaults, overridden by its
   ``tolerance`` option) and fails the export with one clear line when one is exceeded;
5. writes ``manifest.json`` (files with sha256 and size, base model identity, exporter and plugin
   versions, resolved config, fidelity) and renames the directory into place.

A failure at any step removes the temporary directory: nothing is half-written and an earlier
export in the same place is untouched. The format is documented in docs/exporters.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import attrs

from qlora_plugins.core.errors import ExportError, ModelError, OutputExistsError, QloraError, UnsafeOutputError, short_text
from qlora_plugins.core.interfaces import AdapterContext, ExportContext
from qlora_plugins.core.options import in_range
from qlora_plugins.core.rundir import atomic_directory, atomic_write_json
from qlora_plugins.core.safety import (
    TOOL,
    asides_of,
    check_holds_no_input,
    check_no_link_between,
    check_no_links,
    not_an_export_because,
)

Log = Callable[[str], None]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
#: File suffixes that may hold pickles: exporters must write safetensors (or their own format).
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
#: Tolerance of an exporter that declares none.
GENERIC_TOLERANCE = {"max_kl": 1e-3, "min_top1": 0.98}
PROBE_MAX_EXAMPLES = 8
PROBE_MAX_TOKENS = 128

_registry: contextvars.ContextVar[Any] = contextvars.ContextVar("qlora_export_registry", default=None)


# --- options every exporter may take -------------------------------------------------------


def _bound(figure: str, kind: str, low: float, high: float | None):
    return attrs.field(default=None, validator=in_range(low, high), metadata={"figure": figure, "bound": kind})


@attrs.define
class Tolerance:
    """Limits on the fidelity figures; unset fields take the exporter's defaults.

    Each field bounds one figure (its ``metadata``: ``figure`` and ``bound``, ``max`` or ``min``).
    An exporter with figures of its own subclasses this class and adds fields the same way.
    Set a bound out of reach (``max_kl: 1e9``, ``min_top1: 0``) to switch that check off.
    """

    max_kl: Optional[float] = _bound("kl", "max", 0.0, None)
    min_top1: Optional[float] = _bound("top1", "min", 0.0, 1.0)
    max_abs_diff: Optional[float] = _bound("max_abs_diff", "max", 0.0, None)
    max_mean_abs_diff: Optional[float] = _bound("mean_abs_diff", "max", 0.0, None)


@attrs.define
class ExportOptions:
    """Options of every verified exporter (subclass it for an exporter's own options).

    :param tolerance: limits on the fidelity figures (unset ones: the exporter's defaults).
    :param verify: reload the artifact and measure fidelity (off: recorded as skipped).
    :param directory: sub-directory of the exports directory (default: the exporter's name); one
        plain name, so that two exports of the same exporter can coexist.
    :param probe_text: compare on this text instead of held-out training examples.
    """

    tolerance: Tolerance = attrs.field(factory=Tolerance)
    verify: bool = True
    directory: Optional[str] = attrs.field(default=None)
    probe_text: Optional[str] = None

    @directory.validator
    def _check_directory(self, attribute: attrs.Attribute, value: Optional[str]) -> None:
        if value is not None:
            try:
                check_name(value)
            except ExportError as exc:
                raise ValueError(str(exc), attribute) from None


def current_registry() -> Any:
    """The registry the running export uses (a fresh one outside :func:`run_exports`)."""
    registry = _registry.get()
    if registry is None:
        from qlora_plugins.core.registry import create_registry

        registry = create_registry()
    return registry


# --- names and files -----------------------------------------------------------------------


def check_name(name: str) -> str:
    """Return ``name`` if it is one plain path component (no separators, not ``.``/``..``,
    not hidden, not absolute); raise :class:`ExportError` otherwise."""
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
            or "/" in name or "\\" in name or "\x00" in name or ":" in name):
        raise ExportError(f"{name!r} is not a plain file or directory name")
    return name


def safe_path(base: Path, relative: str) -> Path:
    """``base / relative``, refusing anything that would land outside ``base`` (absolute paths,
    ``..`` components, links)."""
    rel = Path(relative)
    if rel.is_absolute() or any(part in ("..", "") for part in rel.parts) or not rel.parts:
        raise ExportError(f"{relative!r} would be written outside {base}")
    target = base / rel
    resolved_base = base.resolve()
    if resolved_base != target.resolve() and resolved_base not in target.resolve().parents:
        raise ExportError(f"{relative!r} would be written outside {base}")
    return target


def check_artifact(directory: Path, exporter_name: str) -> list[Path]:
    """The files an exporter wrote, after checking there are some, that none is a link or a
    pickle-capable format, and that ``manifest.json`` is left to the host."""
    entries = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        entries += [Path(root) / n for n in dirs + names]
    files = []
    for path in sorted(entries):
        rel = path.relative_to(directory)
        if path.is_symlink():
            raise ExportError(f"exporter '{exporter_name}' wrote a link ({rel}); exports hold plain files only")
        if path.is_file():
            if path.suffix.lower() in FORBIDDEN_SUFFIXES:
                raise ExportError(f"exporter '{exporter_name}' wrote {rel}: only safetensors are written for tensors (no pickle formats)")
            if str(rel) == MANIFEST:
                raise ExportError(f"exporter '{exporter_name}' wrote {MANIFEST}, which is reserved for the host")
            files.append(path)
    if not files:
        raise ExportError(f"exporter '{exporter_name}' wrote no files")
    return files


# --- probe batch and logit comparison ------------------------------------------------------


def probe_batch(context: ExportContext, probe_text: str | None = None) -> tuple[dict, str]:
    """Input tensors for the fidelity check and where they came from: ``probe_text`` if given,
    else up to 8 held-out examples, else a built-in paragraph (each at most 128 tokens)."""
    import torch

    tokenizer = context.tokenizer
    if probe_text:
        sequences, source = _text_sequences(tokenizer, probe_text), "probe_text"
    elif context.probe_examples:
        sequences = [list(e["input_ids"])[:PROBE_MAX_TOKENS] for e in list(context.probe_examples)[:PROBE_MAX_EXAMPLES]]
        sequences, source = [s for s in sequences if s], "held-out examples"
    else:
        from qlora_plugins.core.quant_report import DEFAULT_PROBE

        sequences, source = _text_sequences(tokenizer, DEFAULT_PROBE), "built-in text"
    if not sequences:
        raise ExportError("the probe batch is empty (set the exporter's probe_text)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}, source


def _text_sequences(tokenizer: Any, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return [ids[i : i + PROBE_MAX_TOKENS] for i in range(0, min(len(ids), PROBE_MAX_TOKENS * PROBE_MAX_EXAMPLES), PROBE_MAX_TOKENS)]


def _device_of(model: Any) -> Any:
    import torch

    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def model_logits(model: Any, batch: dict) -> Any:
    """The model's logits on ``batch`` as float32 on the CPU."""
    import torch

    device = _device_of(model)
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().float().cpu()


def compare_logits(reference: Any, candidate: Any, attention_mask: Any) -> dict:
    """Fidelity figures of ``candidate`` logits against ``reference`` (same shape): over real
    token positions for ``[batch, seq, vocab]`` logits, over rows for ``[batch, classes]``.

    ``max_abs_diff`` / ``mean_abs_diff``: absolute logit differences; ``kl``: mean
    KL(reference || candidate) of the softmax distributions (nats), ``kl_max`` its largest value;
    ``top1``: fraction of positions whose arg-max agrees.
    """
    import torch

    if tuple(reference.shape) != tuple(candidate.shape):
        raise ExportError(f"the reloaded model's logits have shape {tuple(candidate.shape)}, the trained model's {tuple(reference.shape)}")
    if reference.dim() == 3:
        keep = attention_mask.bool()
        ref, new = reference[keep], candidate[keep]
    else:
        ref, new = reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    if not torch.isfinite(new).all():
        return {"max_abs_diff": math.inf, "mean_abs_diff": math.inf, "kl": math.inf, "kl_max": math.inf, "top1": 0.0, "positions": int(ref.shape[0])}
    diff = (ref - new).abs()
    logp_ref = torch.log_softmax(ref.double(), dim=-1)
    logp_new = torch.log_softmax(new.double(), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp_new)).sum(-1).clamp_min(0.0)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((ref.argmax(-1) == new.argmax(-1)).double().mean()),
        "positions": int(ref.shape[0]),
    }


# --- tolerance -----------------------------------------------------------------------------


def _tolerance_fields(tolerance: Any) -> dict[str, tuple[str, str]]:
    return {f.name: (f.metadata.get("figure", f.name), f.metadata.get("bound", "max")) for f in attrs.fields(type(tolerance)) if "figure" in f.metadata}


def effective_tolerance(exporter: Any) -> dict:
    """The exporter's default tolerance updated with the fields set in its ``tolerance`` option."""
    defaults = getattr(exporter, "default_tolerance", None)
    tolerance = dict(defaults() if callable(defaults) else GENERIC_TOLERANCE)
    configured = getattr(exporter.options, "tolerance", None)
    if configured is not None and attrs.has(type(configured)):
        for name in _tolerance_fields(configured):
            value = getattr(configured, name)
            if value is not None:
                tolerance[name] = value
    return tolerance


def _bounds(exporter: Any) -> dict[str, tuple[str, str]]:
    configured = getattr(exporter.options, "tolerance", None)
    fields = _tolerance_fields(configured) if configured is not None and attrs.has(type(configured)) else {}
    return {**_tolerance_fields(Tolerance()), **fields}


def violations(figures: dict, tolerance: dict, bounds: dict[str, tuple[str, str]]) -> list[str]:
    """Human-readable list of the bounds in ``tolerance`` that ``figures`` exceed."""
    out = []
    for key, limit in tolerance.items():
        figure, kind = bounds.get(key, (key[4:], key[:3]) if key[:4] in ("max_", "min_") else (key, "max"))
        value = figures.get(figure)
        if value is None or limit is None:
            continue
        bad = (value > limit or math.isnan(value)) if kind == "max" else (value < limit or math.isnan(value))
        if bad:
            out.append(f"{figure} {_fmt(value)} {'>' if kind == 'max' else '<'} {key} {_fmt(limit)}")
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


# --- reloading artifacts -------------------------------------------------------------------


@contextlib.contextmanager
def reloaded_artifact(exporter: Any, directory: Path, context: ExportContext, registry: Any) -> Any:
    """A model loaded back from ``directory`` (None when the exporter wrote nothing loadable):
    ``exporter.reload`` if defined; for a saved adapter, the adapter plugin's ``swap_in`` onto the
    trained model's base already in memory, else the adapter attached to a freshly loaded base;
    else a checkpoint directory (plain, bitsandbytes 4-bit or qlora_plugins 4-bit)."""
    own = getattr(exporter, "reload", None)
    if callable(own):
        yield own(directory, context)
        return
    if (directory / "adapter_config.json").is_file():
        with contextlib.ExitStack() as stack:
            try:
                swap_in = getattr(context.adapter, "swap_in", None)
                if swap_in is None:
                    raise NotImplementedError
                swapped = stack.enter_context(swap_in(context.model, directory))
            except NotImplementedError:
                swapped = None
            if swapped is not None:
                yield swapped
                return
        yield load_adapter_onto_base(context, directory)
        return
    if (directory / "config.json").is_file():
        from qlora_plugins.core.checkpoint_format import load_checkpoint

        yield load_checkpoint(directory, context.task, registry, device=context.model_request.device)
        return
    yield None


def load_adapter_onto_base(context: ExportContext, directory: Path) -> Any:
    """Load the base model again through the run's quantizer and attach the adapter saved in
    ``directory`` through the run's adapter plugin (what ``peft.PeftModel.from_pretrained`` does
    for LoRA)."""
    base = context.quantizer.load_model(context.model_request)
    model = context.adapter.load(base, directory, AdapterContext(task=context.task, quantized=context.quantizer.footprint(base).quantized_params > 0))
    return model.eval()


def measure_fidelity(exporter: Any, directory: Path, context: ExportContext, reference: "_Reference", registry: Any, log: Log) -> dict:
    """Reload the artifact in ``directory``, compare it with the trained model, add the
    exporter's own figures (``verify``) and check the tolerance.

    :raises ExportError: when a figure exceeds the tolerance or the artifact does not load.
    """
    options = exporter.options
    tolerance = effective_tolerance(exporter)
    if not getattr(options, "verify", True):
        log(f"  fidelity check of '{exporter.name}' skipped (verify: false)")
        return {"status": "skipped", "tolerance": tolerance}
    result: dict[str, Any] = {}
    probe_text = getattr(options, "probe_text", None)
    batch, source = reference.batch(probe_text)
    expected = reference.logits(probe_text)  # before reloading: an adapter may be swapped into the trained model
    candidate = None
    try:
        with reloaded_artifact(exporter, directory, context, registry) as model:
            if model is not None:
                candidate = model_logits(model, batch)
            del model
    except QloraError as exc:
        raise ExportError(f"export '{exporter.name}': the artifact does not load back: {exc}") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"export '{exporter.name}': the artifact does not load back: {type(exc).__name__}: {first}") from exc
    finally:
        gc.collect()
    if candidate is not None:
        result.update(compare_logits(expected, candidate, batch["attention_mask"]))
        result["probe"] = {"source": source, "sequences": int(batch["input_ids"].shape[0])}
    verify = getattr(exporter, "verify", None)
    if callable(verify):
        result.update(verify(directory, context) or {})
    if not result:
        log(f"  '{exporter.name}' offers no way to reload its artifact: fidelity not measured")
        return {"status": "not_measured", "tolerance": tolerance}
    bad = violations(result, tolerance, _bounds(exporter))
    result["tolerance"] = tolerance
    result["status"] = "failed" if bad else "passed"
    log("  fidelity: " + _summary(result))
    if bad:
        raise ExportError(
            f"export '{exporter.name}' failed its fidelity check ({'; '.join(bad)}); nothing was written. "
            f"Loosen it with the exporter option tolerance (e.g. --option tolerance.{bad[0].split()[3]}=...)"
        )
    return result


def _summary(figures: dict) -> str:
    parts = []
    for key, label in (("kl", "KL"), ("top1", "top-1"), ("max_abs_diff", "max |dlogit|"), ("mean_abs_diff", "mean |dlogit|")):
        if key in figures:
            parts.append(f"{label} {_fmt(figures[key])}")
    extra = [k for k in figures if k not in ("kl", "kl_max", "top1", "max_abs_diff", "mean_abs_diff", "positions", "probe", "tolerance", "status")]
    parts += [f"{k} {_fmt(figures[k])}" for k in extra if isinstance(figures[k], (int, float))]
    return ", ".join(parts)


class _Reference:
    """The trained model's probe batch and logits, computed once per probe text."""

    def __init__(self, context: ExportContext) -> None:
        self.context = context
        self._cache: dict = {}

    def batch(self, probe_text: str | None) -> tuple[dict, str]:
        if probe_text not in self._cache:
            batch, source = probe_batch(self.context, probe_text)
            self._cache[probe_text] = (batch, source, None)
        batch, source, _ = self._cache[probe_text]
        return batch, source

    def logits(self, probe_text: str | None) -> Any:
        batch, source, logits = self._cache[probe_text]
        if logits is None:
            logits = model_logits(self.context.model, batch)
            self._cache[probe_text] = (batch, source, logits)
        return logits


# --- merging adapters into plain weights ---------------------------------------------------


def tuner_layers(model: Any) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft tuner layer that can compute a delta weight (LoRA and
    friends), outermost first."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight")]


def delta_weight(layer: Any) -> Any:
    """Sum of the active, unmerged adapters' delta weights of a tuner layer (fp32), or None."""
    delta = None
    merged = set(getattr(layer, "merged_adapters", []) or [])
    for adapter in layer.active_adapters:
        if adapter in merged or adapter not in getattr(layer, "lora_A", {adapter: None}):
            continue
        d = layer.get_delta_weight(adapter).float()
        delta = d if delta is None else delta + d
    return delta


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


def unwrap_adapter(model: Any) -> Any:
    """The plain transformers model inside a peft model (tuner layers replaced by their base
    layers, ``modules_to_save`` by the trained copy), without merging anything."""
    if hasattr(model, "peft_config") and hasattr(model, "unload"):
        return model.unload()
    return model


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


def merged_model(model: Any, dtype: Any = None, base_model_path: Path | None = None) -> Any:
    """A standalone full-precision copy of a trained model: every quantized layer dequantized,
    the adapter's delta weights added, peft wrappers removed; cast to ``dtype`` if given.
    ``model`` itself is not modified.

    :raises ExportError: when the adapter cannot be merged (no delta weights).
    """
    import copy

    import torch

    work = copy.deepcopy(model)
    inner = work.get_base_model() if hasattr(work, "get_base_model") else work
    types = original_layer_types(inner)
    with torch.no_grad():
        for name, layer in tuner_layers(work):
            base = layer.get_base_layer()
            weight = dequantized_weight(base)
            delta = delta_weight(layer)
            if delta is not None:
                weight = weight + delta.to(weight.device)
            layer.base_layer = plain_layer(base, weight, types.get(_inner_name(name)))
        plain = unwrap_adapter(work)
        from qlora_plugins.core.modeling import set_submodule

        for name, module in list(plain.named_modules()):
            if is_quantized_layer(module):
                set_submodule(plain, name, plain_layer(module, dequantized_weight(module), types.get(name)))
    finish_plain_model(plain, base_model_path)
    if dtype is not None:
        plain.to(dtype)
        plain.config.dtype = dtype
    return plain


def _inner_name(name: str) -> str:
    """A module name inside a peft model, as the wrapped transformers model names it."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# --- manifest ------------------------------------------------------------------------------


def base_model_identity(path: Path) -> dict:
    """Path, model_type, architectures, sha256 of config.json and the weight files' names and sizes."""
    from qlora_plugins.core.checkpoint_format import file_sha256

    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    config_file = path / "config.json"
    if config_file.is_file():
        info["config_sha256"] = file_sha256(config_file)
        with contextlib.suppress(OSError, ValueError):
            config = json.loads(config_file.read_text(encoding="utf-8"))
            info["model_type"] = config.get("model_type")
            info["architectures"] = config.get("architectures")
    info["weights"] = [{"path": p.name, "size": p.stat().st_size} for p in sorted(path.glob("*.safetensors"))]
    return info


def _registration(registry: Any, kind: str, plugin: Any) -> dict:
    from qlora_plugins.core.options import options_to_dict

    out = {"name": plugin.name, "class": f"{type(plugin).__module__}.{type(plugin).__qualname__}"}
    with contextlib.suppress(QloraError, KeyError, AttributeError):
        reg = registry.registration(kind, plugin.name)
        out.update({"distribution": reg.source.distribution, "version": reg.source.version})
    with contextlib.suppress(Exception):
        out["options"] = options_to_dict(plugin.options)
    return out


def build_manifest(exporter: Any, context: ExportContext, directory: Path, files: Sequence[Path], info: dict, fidelity: dict, registry: Any) -> dict:
    """The ``manifest.json`` of an export (see docs/exporters.md)."""
    from qlora_plugins.core.checkpoint_format import file_sha256
    from qlora_plugins.core.pipeline import versions

    return {
        "manifest_version": MANIFEST_VERSION,
        "tool": TOOL,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exporter": _registration(registry, "exporter", exporter),
        "plugins": {
            "quantizer": _registration(registry, "quantizer", context.quantizer),
            "adapter": _registration(registry, "adapter", context.adapter),
        },
        "versions": versions(),
        "task": context.task,
        "base_model": base_model_identity(context.base_model_path),
        "info": info,
        "fidelity": fidelity,
        "files": [{"path": str(p.relative_to(directory)), "size": p.stat().st_size, "sha256": file_sha256(p)} for p in files],
        "config": context.config,
    }


# --- running exporters ---------------------------------------------------------------------


def export_directory(exporter: Any, exports_dir: Path) -> Path:
    """Where an exporter's artifact goes inside ``exports_dir``: its ``directory`` option or its
    name, checked to be a plain name."""
    name = getattr(exporter.options, "directory", None) or exporter.name
    return safe_path(exports_dir, check_name(name))


#: Keys of an export's result that the host sets; an exporter's facts never overwrite them.
RESERVED_RESULT_KEYS = frozenset({"exporter", "path", "files", "bytes", "seconds", "fidelity"})


def check_export_target(final: Path, force: bool) -> None:
    """Refuse an export target that is a link, that is in the way (non-empty, no ``force``), or
    that ``--force`` may not replace because it is not provably an export of this tool."""
    if final.is_symlink():
        raise UnsafeOutputError(f"{final} is a symbolic link; refusing to write an export through it")
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        if not force:
            raise OutputExistsError(f"{final} exists and is not empty; pass --force to replace it")
        reason = not_an_export_because(final)
        if reason:
            raise UnsafeOutputError(f"{final} is not an export written by qlora ({reason}); refusing to replace it even with --force")


def remove_own_temporaries(final: Path) -> None:
    """Clean up after an export to ``final`` that was killed: delete its temporary directories,
    and put back the previous export if it was moved aside and never replaced."""
    import shutil

    parent = final.parent
    if not parent.is_dir() or parent.is_symlink():
        return
    asides = asides_of(final)
    if asides and not final.exists() and not final.is_symlink():
        os.rename(asides[-1], final)
    for entry in parent.glob(f".{final.name}.*.tmp"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def run_exports(context: ExportContext, exporters: list, exports_dir: Path, registry: Any, force: bool, log: Log,
                outputs: Sequence[Path] | None = None) -> dict:
    """Run, verify and record each exporter into ``exports_dir/<name>`` (or ``outputs[i]``)
    through a temporary directory; return facts and fidelity keyed by exporter name (by directory
    name when an exporter runs twice)."""
    targets = list(outputs) if outputs is not None else [export_directory(e, exports_dir) for e in exporters]
    seen: dict[Path, str] = {}
    for exporter, final in zip(exporters, targets):
        key = final.resolve()
        if key in seen:
            raise ExportError(f"exporters '{seen[key]}' and '{exporter.name}' would both write {final}; give one a `directory` option")
        seen[key] = exporter.name
        check_export_target(final, force)
    for final in targets:
        remove_own_temporaries(final)
    reference = _Reference(context)
    results = {}
    token = _registry.set(registry)
    try:
        for exporter, final in zip(exporters, targets):
            log(f"Exporting with '{exporter.name}' to {final}")
            started = time.perf_counter()
            with atomic_directory(final, force=force, not_ours=not_an_export_because) as tmp:
                try:
                    info = exporter.export(context, tmp) or {}
                except QloraError:
                    raise
                except Exception as exc:
                    reg = registry.registration("exporter", exporter.name)
                    first = (str(exc).strip().splitlines() or [""])[0]
                    raise ExportError(f"exporter '{exporter.name}' ({reg.source.describe()}) failed: {type(exc).__name__}: {first}") from exc
                check_artifact(tmp, exporter.name)
                fidelity = measure_fidelity(exporter, tmp, context, reference, registry, log)
                files = check_artifact(tmp, exporter.name)
                manifest = build_manifest(exporter, context, tmp, files, info, fidelity, registry)
                atomic_write_json(tmp / MANIFEST, manifest)
            label = next(x for x in (exporter.name, final.name, str(final)) if x not in results)
            results[label] = {
                **{k: v for k, v in info.items() if k not in RESERVED_RESULT_KEYS},  # the host's own keys win
                "exporter": exporter.name,
                "path": str(final),
                "files": sorted(f["path"] for f in manifest["files"]),
                "bytes": sum(f["size"] for f in manifest["files"]),
                "seconds": round(time.perf_counter() - started, 3),
                "fidelity": fidelity,
            }
    finally:
        _registry.reset(token)
    return results


# --- loading a finished run (qlora export) -------------------------------------------------


ADAPTER_DIR = "adapter"


def _read_run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ExportError(f"RUN_DIR: {run_dir} is not a directory")
    if not path.is_file():
        raise ExportError(f"RUN_DIR: {run_dir} is not a qlora run directory (no config.yaml)")
    from qlora_plugins.core.config import load_yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, QloraError) as exc:
        raise ExportError(f"{path}: cannot read the run's config: {short_text(str(exc), 300)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ExportError(f"{path}: not a run config (no model section)")
    return data


def _check_adapter_dir(run_dir: Path) -> Path:
    adapter_dir = run_dir / ADAPTER_DIR
    if not adapter_dir.is_dir() or not any(adapter_dir.iterdir()):
        raise ExportError(f"{run_dir} has no trained adapter ({ADAPTER_DIR}/ is missing or empty); did the run finish?")
    from qlora_plugins.core.checkpoint_format import check_safetensors

    weights = sorted(adapter_dir.glob("*.safetensors"))
    for path in weights:
        try:
            check_safetensors(path)
        except ModelError as exc:
            raise ExportError(f"adapter: {exc}") from None
    return adapter_dir


def _model_type(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    return None


def _check_adapter_base(adapter_dir: Path, model_dir: Path) -> None:
    """Refuse an adapter trained on a model of another type than ``model_dir``'s."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        return
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if recorded and Path(recorded).is_dir() and Path(recorded).resolve() != Path(model_dir).resolve():
            trained, now = _model_type(Path(recorded)), _model_type(model_dir)
            if trained and now and trained != now:
                raise ExportError(f"the adapter in {adapter_dir} was trained on a {trained} model ({recorded}), but the run's base model {model_dir} is a {now} model")


def _num_labels_from_adapter(adapter_dir: Path) -> int | None:
    from safetensors import safe_open

    with contextlib.suppress(Exception):
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                    return int(handle.get_slice(key).get_shape()[0])
    return None


def _check_adapter_loaded(model: Any, adapter_dir: Path) -> None:
    """Every tensor of a PEFT adapter file must have found its place in the model."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file() or not hasattr(model, "peft_config"):
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    present = set(get_peft_model_state_dict(model).keys())
    lost = sorted(saved - present)
    if lost:
        raise ExportError(f"the adapter in {adapter_dir} does not match the base model: {len(lost)} tensor(s) have no place in it (e.g. {lost[0]})")


def load_run(run_dir: Path, registry: Any, log: Log = lambda m: None) -> ExportContext:
    """Load a finished run (``RUN_DIR/config.yaml`` + ``RUN_DIR/adapter``) back into the trained
    model through the same plugins; the probe examples are the run's held-out examples when its
    data file is still there.

    :raises ExportError: no adapter, an adapter that does not fit the base, corrupt files.
    """
    import copy

    from qlora_plugins.core import modeling, pipeline
    from qlora_plugins.core.config import ResolvedPlugins, parse_config
    from qlora_plugins.core.interfaces import DataContext

    run_dir = Path(run_dir)
    data = _read_run_config(run_dir)
    adapter_dir = _check_adapter_dir(run_dir)
    resolved = copy.deepcopy(data)
    parse = copy.deepcopy(data)
    model = dict(parse["model"])
    if model.get("path") and model.get("source"):
        if not Path(model["path"]).is_dir():
            model.pop("path")
        else:
            model.pop("source")
    parse["model"] = model
    parse["train"] = {**(parse.get("train") or {}), "enabled": False}
    data_path = ((parse.get("data") or {}).get("path")) if isinstance(parse.get("data"), dict) else None
    keep_data = bool(data_path) and Path(data_path).is_file()
    if not keep_data:
        parse.pop("data", None)
    parse["export"] = []
    config = parse_config(parse, run_dir / "config.yaml")
    checked_quantizer = registry.create("quantizer", config.quantizer.name, config.quantizer.options, "quantizer")
    adapter = registry.create("adapter", config.adapter.name, config.adapter.options, "adapter")
    if config.model.path is not None:
        model_dir = config.resolve_path(config.model.path)
        modeling.check_model_dir(model_dir)
    else:
        from qlora_plugins.core.sources import materialize_source

        model_dir = materialize_source(registry, config.model.source)
    _check_adapter_base(adapter_dir, model_dir)
    device = modeling.choose_device(config.train.device)
    tokenizer = modeling.load_tokenizer(model_dir, config.model.trust_remote_code)

    probe: list = []
    num_labels = config.model.num_labels
    if keep_data and config.data is not None:
        try:
            data_plugin = registry.create("data_format", config.data.name, config.data.options, "data")
            splits = data_plugin.load(DataContext(tokenizer, config.model.task, config.train.seed, config.base_dir, "data"))
            probe = list(splits.eval[:PROBE_MAX_EXAMPLES] or splits.train[:PROBE_MAX_EXAMPLES])
            num_labels = num_labels or splits.num_labels
        except QloraError as exc:
            log(f"Probe: the run's data is not usable ({exc}); comparing on a built-in text")
    if config.model.task == "seq_cls" and num_labels is None:
        num_labels = _num_labels_from_adapter(adapter_dir)

    log(f"Loading {model_dir} with quantizer '{checked_quantizer.name}' and the adapter in {adapter_dir}")
    request = pipeline.model_request(config, model_dir, device, num_labels)
    plugins = ResolvedPlugins(checked_quantizer, adapter, None, None, [])
    base = pipeline.load_base(plugins, request, tokenizer)
    quantized = checked_quantizer.footprint(base).quantized_params > 0
    try:
        trained = adapter.load(base, adapter_dir, AdapterContext(task=config.model.task, quantized=quantized))
    except QloraError:
        raise
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = next((line for line in lines if "size mismatch" in line or "not found" in line), lines[0])
        raise ExportError(f"the adapter in {adapter_dir} does not match the base model {model_dir} "
                          f"({_model_type(model_dir)}): {detail[:300]}") from None
    _check_adapter_loaded(trained, adapter_dir)
    trained.eval()
    return ExportContext(trained, tokenizer, model_dir, config.model.task, checked_quantizer, adapter, resolved, request, probe)


def _exporter_options(run_config: dict, name: str, overrides: Sequence[str], names: Sequence[str] = ()) -> dict:
    """The options of exporter ``name`` recorded in the run's config (first entry of that name),
    with ``KEY=VALUE`` overrides applied: ``NAME.KEY=VALUE`` (NAME one of ``names``) applies to
    that exporter only, a plain ``KEY=VALUE`` to every exporter."""
    from qlora_plugins.core.config import apply_overrides

    options: dict = {}
    for entry in run_config.get("export") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            options = {k: v for k, v in entry.items() if k != "name"}
            break
    mine = []
    for item in overrides:
        first, dot, rest = item.partition(".")
        if dot and first in names and "=" not in first:
            if first == name:
                mine.append(rest)
        else:
            mine.append(item)
    if mine:
        options = apply_overrides(options, mine)
    return options


def export_run(run_dir: Path, names: Sequence[str], registry: Any, output: Path | None = None, options: Sequence[str] = (),
               force: bool = False, log: Log = lambda m: None) -> dict:
    """``qlora export``: run exporters ``names`` on the finished run in ``run_dir``.

    The artifact of a single exporter goes to ``output`` (default ``RUN_DIR/exports/<name>``);
    with several, to ``output/<name>``. Each exporter starts from its options in the run's
    config (if listed there), updated with ``options`` (``KEY=VALUE``, values YAML).
    ``NAME.KEY=VALUE`` applies to exporter NAME only. Names, options and output directories are
    checked before anything is loaded.
    """
    run_dir = Path(run_dir)
    run_config = _read_run_config(run_dir)
    check_no_links(run_dir.resolve(), "RUN_DIR")
    if not names:
        raise ExportError("name at least one exporter (--exporter NAME)")
    exporters = []
    for name in names:
        registry.get("exporter", name, "--exporter")
        exporters.append(registry.create("exporter", name, _exporter_options(run_config, name, options, names), f"--exporter {name}"))
    if output is None:
        outputs = [export_directory(e, run_dir / "exports") for e in exporters]
    elif len(exporters) == 1:
        outputs = [Path(output)]
    else:
        outputs = [export_directory(e, Path(output)) for e in exporters]
    run_res = run_dir.resolve()
    inputs = [("RUN_DIR", run_res)] + _run_inputs(run_config, run_res)
    for out in outputs:
        res = out.resolve() if not out.is_symlink() else out.absolute()
        if res == run_res or res in run_res.parents or run_res / ADAPTER_DIR == res or (run_res / ADAPTER_DIR) in res.parents:
            raise ExportError(f"--output: {out} would replace the run directory or its adapter; choose another directory")
        if run_res in res.parents:
            if run_res / "exports" not in res.parents:
                raise ExportError(f"--output: {out} is inside the run directory but not under its exports/; choose another directory")
            check_no_link_between(run_res, res, "--output")
        check_holds_no_input(res, inputs, "--output")
        try:
            check_export_target(out, force)
        except (OutputExistsError, UnsafeOutputError) as exc:
            raise type(exc)(f"--output: {exc}") from None
    context = load_run(run_dir, registry, log)
    results = run_exports(context, exporters, run_dir / "exports", registry, force, log, outputs=outputs)
    _record_in_report(run_dir, results)
    return results


def _run_inputs(run_config: dict, run_dir: Path) -> list[tuple[str, Path | None]]:
    """The run's base model and data as recorded in its config (a ``--force`` export never
    replaces a directory holding them)."""
    found: list[tuple[str, Path | None]] = []
    model = run_config.get("model") if isinstance(run_config.get("model"), dict) else {}
    data = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    for label, value in (("the run's base model", model.get("path")), ("the run's data", data.get("path"))):
        if isinstance(value, str) and value:
            path = Path(value)
            found.append((label, path if path.is_absolute() else run_dir / path))
    return found


def _record_in_report(run_dir: Path, results: dict) -> None:
    """Add the exports to the run's report.json (when there is one)."""
    path = run_dir / "report.json"
    if not path.is_file():
        return
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(report, dict):
            report.setdefault("exports", {}).update(results)
            atomic_write_json(path, report)
