"""Where exports go and what they may contain: plain names, paths that stay inside their
directory, targets that ``--force`` may replace, and artifacts of plain, pickle-free files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qlora_plugins.core.errors import ExportError, OutputExistsError, UnsafeOutputError
from qlora_plugins.core.safety import MANIFEST, asides_of, not_an_export_because
from qlora_plugins.core.wording import option

#: File suffixes that may hold pickles: exporters must write safetensors (or their own format).
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


def check_name(name: str) -> str:
    """Return ``name`` if it is one plain path component (no separators, not ``.``/``..``,
    not hidden, not absolute); raise :class:`ExportError` otherwise."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or ":" in name
    ):
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


def export_directory(exporter: Any, exports_dir: Path) -> Path:
    """Where an exporter's artifact goes inside ``exports_dir``: its ``directory`` option or its
    name, checked to be a plain name."""
    name = getattr(exporter.options, "directory", None) or exporter.name
    return safe_path(exports_dir, check_name(name))


def check_export_target(final: Path, force: bool) -> None:
    """Refuse an export target that is a link, that is in the way (non-empty, no ``force``), or
    that ``--force`` may not replace because it is not provably an export of this tool."""
    if final.is_symlink():
        raise UnsafeOutputError(f"{final} is a symbolic link; refusing to write an export through it")
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        if not force:
            raise OutputExistsError(f"{final} exists and is not empty; pass {option('force')} to replace it")
        reason = not_an_export_because(final)
        if reason:
            raise UnsafeOutputError(
                f"{final} is not an export written by qlora ({reason}); refusing to replace it even with {option('force')}"
            )


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
