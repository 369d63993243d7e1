"""What the tool may replace or delete, and where it may write: the rules of docs/security.md.

- ``--force`` replaces only what this tool provably wrote: a run directory whose ``run.json``
  names the tool and which holds nothing but the files a run writes, or an export whose
  ``manifest.json`` lists every file in it. Never a directory that is, or contains, an input of
  the current command (config, model, data, the run being exported).
- A directory handed to the tool (``--resume RUN``, ``qlora export RUN``, ``--force`` on a run)
  is untrusted input: if it holds a symbolic link anywhere, nothing is written into it, because
  a write, replacement or deletion could follow the link out of it.
- A replaced directory is moved aside first and deleted only after its replacement is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from qlora_plugins.core.errors import UnsafeOutputError, WriteError

TOOL = "qlora-plugins"
RUN_MARKER = "run.json"
#: Entries a run writes at the top of its directory.
RUN_FILES = frozenset({"config.yaml", RUN_MARKER, "metrics.jsonl", "report.json", "loss.png"})
RUN_DIRS = frozenset({"adapter", "exports", "checkpoints", "tracking"})
MANIFEST = "manifest.json"
#: Suffix of every temporary file or directory the tool creates (always with a leading dot).
TEMP_SUFFIX = ".tmp"
#: Marks a directory moved aside by ``--force`` until its replacement is complete.
ASIDE_MARK = ".replaced"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of this tool's temporaries (``.NAME.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def first_link(root: Path) -> Path | None:
    """The first symbolic link inside ``root`` (``root`` itself excluded), or None."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                return path
    return None


def check_no_links(root: Path, what: str) -> None:
    """Refuse to write into ``root`` when it holds a symbolic link anywhere."""
    link = first_link(root)
    if link is not None:
        raise UnsafeOutputError(
            f"{what}: {link} is a symbolic link; qlora never writes links, so it refuses to write into, "
            f"replace or delete anything in {root}"
        )


def check_no_link_between(root: Path, target: Path, what: str) -> None:
    """Refuse ``target`` when any existing path component from ``root`` (excluded) down to it is a link."""
    relative = target.relative_to(root)
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise UnsafeOutputError(f"{what}: {current} is a symbolic link; refusing to write through it")
        if not current.exists():
            return


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_holds_no_input(target: Path, inputs: Iterable[tuple[str, Path | None]], what: str) -> None:
    """Refuse to replace ``target`` if it is, or contains, one of ``inputs`` (label, path)."""
    resolved = target.resolve()
    for label, path in inputs:
        if path is None:
            continue
        if _inside(Path(path).resolve(), resolved):
            raise UnsafeOutputError(
                f"{what}: {target} holds {label} ({path}), an input of this command; "
                "refusing to replace it (choose another output directory)"
            )


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_run_marker(path: Path) -> bool:
    """Whether ``path`` is a ``run.json`` this tool wrote (a JSON object naming the tool)."""
    marker = _read_json(path)
    return isinstance(marker, dict) and marker.get("tool") == TOOL


def not_a_run_because(path: Path) -> str | None:
    """Why ``path`` is not provably a run directory this tool wrote (None when it is)."""
    if not is_run_marker(path / RUN_MARKER):
        return f"it has no {RUN_MARKER} written by {TOOL}"
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        name = entry.name
        if is_temporary(name):
            continue
        if entry.is_symlink():
            return f"{entry} is a symbolic link"
        if name in RUN_FILES and entry.is_file():
            continue
        if name in RUN_DIRS and entry.is_dir():
            continue
        return f"it holds {name}, which a qlora run does not write"
    exports = path / "exports"
    if exports.is_dir():
        for entry in sorted(exports.iterdir(), key=lambda p: p.name):
            reason = None if is_temporary(entry.name) else not_an_export_because(entry)
            if reason is not None:
                return f"exports/{entry.name} is not an export written by {TOOL}: {reason}"
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if not is_temporary(entry.name) and not (entry.is_dir() and entry.name.startswith("step-")):
                return f"it holds checkpoints/{entry.name}, which a qlora run does not write"
    link = first_link(path)
    if link is not None:
        return f"{link} is a symbolic link"
    return None


def not_an_export_because(path: Path) -> str | None:
    """Why ``path`` is not provably an export this tool wrote: ``manifest.json`` must list every
    file in it, and it may hold no links (None when it is one)."""
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or "manifest_version" not in manifest or not isinstance(manifest.get("files"), list):
        return f"it has no {MANIFEST} written by {TOOL}"
    listed = {str(f.get("path")) for f in manifest["files"] if isinstance(f, dict)}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            rel = str(entry.relative_to(path))
            if entry.is_symlink():
                return f"{rel} is a symbolic link"
            if entry.is_file() and rel != MANIFEST and rel not in listed:
                return f"it holds {rel}, which its {MANIFEST} does not list"
    return None


def move_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden sibling (deleted later by :func:`remove_aside`)."""
    for attempt in range(1000):
        aside = path.with_name(f".{path.name}{ASIDE_MARK}-{os.getpid()}-{attempt}{TEMP_SUFFIX}")
        if not aside.exists():
            break
    try:
        os.rename(path, aside)
    except OSError as exc:
        raise WriteError(f"cannot move {path} aside to replace it: {exc.strerror}") from None
    return aside


def remove_aside(aside: Path) -> None:
    """Delete a directory moved aside (it is ours: it was checked before it was moved)."""
    shutil.rmtree(aside, ignore_errors=True)


def asides_of(path: Path) -> list[Path]:
    """Earlier directories moved aside from ``path`` by ``--force`` whose replacement never completed."""
    parent = path.parent
    if not parent.is_dir():
        return []
    prefix = f".{path.name}{ASIDE_MARK}-"
    return sorted(
        p for p in parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(TEMP_SUFFIX) and p.is_dir() and not p.is_symlink()
    )


def remove_stale_temporaries(directory: Path) -> None:
    """Delete this tool's temporaries directly inside ``directory`` (left by a killed process)."""
    if not directory.is_dir() or directory.is_symlink():
        return
    for entry in directory.iterdir():
        if is_temporary(entry.name) and ASIDE_MARK not in entry.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
