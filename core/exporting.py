"""Running exporters: each writes into a temporary directory that is renamed into place only when
complete, so a failed export leaves any earlier export untouched."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from qlora_plugins.core.errors import ExportError, QloraError
from qlora_plugins.core.interfaces import ExportContext
from qlora_plugins.core.rundir import atomic_directory

Log = Callable[[str], None]


def run_exports(context: ExportContext, exporters: list, exports_dir: Path, registry: Any, force: bool, log: Log) -> dict:
    """Run each exporter into ``exports_dir/<name>`` via a temporary directory; return their info."""
    results = {}
    for exporter in exporters:
        final = exports_dir / exporter.name
        log(f"Exporting with '{exporter.name}' to {final}")
        started = time.perf_counter()
        with atomic_directory(final, force=force) as tmp:
            try:
                info = exporter.export(context, tmp) or {}
            except QloraError:
                raise
            except Exception as exc:
                reg = registry.registration("exporter", exporter.name)
                raise ExportError(f"exporter '{exporter.name}' ({reg.source.describe()}) failed: {type(exc).__name__}: {exc}") from exc
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            if not files:
                raise ExportError(f"exporter '{exporter.name}' wrote no files")
        results[exporter.name] = {"path": str(final), "files": files, "seconds": round(time.perf_counter() - started, 3), **info}
    return results
