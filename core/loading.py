"""Loading the base model through the run's quantizer, and the facts a report records about it
(parameter counts, plugins and library versions)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any, Iterator

from qlora_plugins.core import modeling
from qlora_plugins.core.config import Config, ResolvedPlugins
from qlora_plugins.core.errors import ModelError, PluginError, QloraError
from qlora_plugins.core.interfaces import ModelRequest
from qlora_plugins.core.options import options_to_dict


def model_request(config: Config, model_dir: Path, device: str, num_labels: int | None) -> ModelRequest:
    """How the quantizer should load the base model."""
    kwargs = {}
    if config.model.task == "seq_cls":
        kwargs["num_labels"] = config.model.num_labels or num_labels or 2
    return ModelRequest(
        path=model_dir,
        task=config.model.task,
        auto_class=modeling.auto_class(config.model.task),
        dtype=modeling.torch_dtype(config.model.dtype),
        device=device,
        trust_remote_code=config.model.trust_remote_code,
        model_kwargs=kwargs,
        skip_modules=list(modeling.DEFAULT_SKIP_MODULES),
        frozen_dtype=modeling.torch_dtype(config.model.frozen_dtype) if config.model.frozen_dtype else None,
    )


def _first_line(exc: BaseException) -> str:
    # (a QloraError keeps its option marks, so that a message wrapping it is spelled by its reader)
    text = (Exception.__str__(exc) if isinstance(exc, QloraError) else str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def plugin_check(registry: Any, plugin: Any, where: str) -> Iterator[None]:
    """Around a plugin's ``check``: an input error passes as it is; anything else is a fault of
    the plugin, reported in one line that names it, where it came from and ``where``."""
    try:
        yield
    except QloraError:
        raise
    except Exception as exc:
        source = registry.registration(plugin.kind, plugin.name).source.describe()
        raise PluginError(
            f"{where}: {plugin.kind} '{plugin.name}' ({source}) failed its check: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _raised_by_transformers(exc: BaseException) -> bool:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}transformers{os.sep}" in frames[-1].filename


def load_base(plugins: ResolvedPlugins, request: ModelRequest, tokenizer: Any, registry: Any = None) -> Any:
    """Load the base model through the quantizer. Unreadable or mismatched checkpoints are a
    ModelError naming the model directory; anything else the quantizer raises is a PluginError
    naming the quantizer and its distribution."""
    from safetensors import SafetensorError

    quantizer = plugins.quantizer
    try:
        model = quantizer.load_model(request)
    except QloraError:
        raise
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"model.path: cannot load {request.path}: {_first_line(exc)}") from None
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":  # torch's weights_only=True refused a pickle file
            raise ModelError(
                f"model.path: {request.path}: pytorch_model.bin cannot be loaded safely (weights_only=True refused it): "
                f"{_first_line(exc)}; convert the checkpoint to safetensors"
            ) from None
        streamed = str(getattr(quantizer, "load_path", "") or "")
        if "shape" in streamed:
            detail = streamed.partition("(")[2].rstrip(")")
            raise ModelError(f"model.path: cannot load {request.path}: weight shapes do not match config.json ({detail})") from None
        if _raised_by_transformers(exc):  # the checkpoint or its config, not the quantizer
            raise ModelError(f"model.path: cannot load {request.path}: {_first_line(exc)}") from None
        where = ""
        if registry is not None:
            where = f" ({registry.registration('quantizer', quantizer.name).source.describe()})"
        raise PluginError(
            f"quantizer '{quantizer.name}'{where} failed while loading {request.path}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_report(model: Any, footprint: Any) -> dict:
    """Logical parameter counts: integer-typed parameters are packed quantized storage, whose
    logical count comes from the quantizer's footprint."""
    total = trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        if p.dtype.is_floating_point:
            total += p.numel()
    total += footprint.quantized_params
    return {
        "total": total,
        "trainable": trainable,
        "quantized": footprint.quantized_params,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
    }


def plugin_report(registry: Any, plugins: ResolvedPlugins) -> dict:
    """Name, distribution, version and options of each plugin used."""

    def one(kind: str, plugin: Any) -> dict:
        reg = registry.registration(kind, plugin.name)
        return {
            "name": plugin.name,
            "distribution": reg.source.distribution,
            "version": reg.source.version,
            "options": options_to_dict(plugin.options),
        }

    out = {
        "quantizer": one("quantizer", plugins.quantizer),
        "adapter": one("adapter", plugins.adapter),
        "optimizer": one("optimizer", plugins.optimizer),
    }
    if plugins.data is not None:
        out["data"] = one("data_format", plugins.data)
    out["exporters"] = [one("exporter", e) for e in plugins.exporters]
    if plugins.evaluators:
        out["evaluators"] = [one("evaluator", e) for e in plugins.evaluators]
    out["trackers"] = [one("tracker", t) for t in plugins.trackers]
    return out


def versions() -> dict:
    """Versions of the libraries the run used."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "qlora-plugins"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
