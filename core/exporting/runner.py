"""Running exporters. For each one, :func:`run_exports`:

1. runs ``exporter.export(context, tmp)`` into an empty temporary sibling of the final directory;
2. checks the files (:func:`~qlora_plugins.core.exporting.paths.check_artifact`);
3. measures fidelity (:mod:`~qlora_plugins.core.exporting.fidelity`);
4. writes ``manifest.json`` and renames the directory into place.

A failure at any step removes the temporary directory: nothing is half-written and an earlier
export in the same place is untouched. The format is documented in docs/exporters.md.
"""

from __future__ import annotations

import contextvars
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from qlora_plugins.core.errors import ExportError, QloraError
from qlora_plugins.core.exporting.fidelity import _Reference, measure_fidelity
from qlora_plugins.core.exporting.manifest import build_manifest
from qlora_plugins.core.exporting.paths import check_artifact, check_export_target, export_directory, remove_own_temporaries
from qlora_plugins.core.interfaces import ExportContext
from qlora_plugins.core.progress import current as current_progress
from qlora_plugins.core.rundir import atomic_directory, atomic_write_json
from qlora_plugins.core.safety import MANIFEST, not_an_export_because

Log = Callable[[str], None]

_registry: contextvars.ContextVar[Any] = contextvars.ContextVar("qlora_export_registry", default=None)


def current_registry() -> Any:
    """The registry the running export uses (a fresh one outside :func:`run_exports`)."""
    registry = _registry.get()
    if registry is None:
        from qlora_plugins.core.registry import create_registry

        registry = create_registry()
    return registry


RESERVED_RESULT_KEYS = frozenset({"exporter", "path", "files", "bytes", "seconds", "fidelity"})


def run_exports(
    context: ExportContext, exporters: list, exports_dir: Path, registry: Any, force: bool, log: Log, outputs: Sequence[Path] | None = None
) -> dict:
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
            with (
                current_progress().stage(f"export {exporter.name}", unit="file") as stage,
                atomic_directory(final, force=force, not_ours=not_an_export_because) as tmp,
            ):
                try:
                    info = exporter.export(context, tmp) or {}
                except QloraError:
                    raise
                except Exception as exc:
                    reg = registry.registration("exporter", exporter.name)
                    first = (str(exc).strip().splitlines() or [""])[0]
                    raise ExportError(
                        f"exporter '{exporter.name}' ({reg.source.describe()}) failed: {type(exc).__name__}: {first}"
                    ) from exc
                check_artifact(tmp, exporter.name)
                fidelity = measure_fidelity(exporter, tmp, context, reference, registry, log)
                files = check_artifact(tmp, exporter.name)
                manifest = build_manifest(exporter, context, tmp, files, info, fidelity, registry)
                atomic_write_json(tmp / MANIFEST, manifest)
                stage.update(len(files))
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
