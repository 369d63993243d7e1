"""``manifest.json`` of an export: what was written (files with sha256 and size), from what (base
model identity, plugins and versions, resolved config) and how faithfully (fidelity)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from qlora_plugins.core.errors import QloraError
from qlora_plugins.core.interfaces import ExportContext
from qlora_plugins.core.safety import TOOL

MANIFEST_VERSION = 1


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


def build_manifest(
    exporter: Any, context: ExportContext, directory: Path, files: Sequence[Path], info: dict, fidelity: dict, registry: Any
) -> dict:
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
