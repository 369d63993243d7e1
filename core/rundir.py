"""The run directory and atomic file writes.

Files are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written file; directories produced in one go (exports) are built in a temporary sibling
directory and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from qlora_plugins.core.errors import OutputExistsError, UnsafeOutputError, WriteError
from qlora_plugins.core.safety import (
    RUN_MARKER,
    check_holds_no_input,
    move_aside,
    not_a_run_because,
    remove_aside,
)
from qlora_plugins.core.wording import option

__all__ = [
    "RUN_MARKER",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_yaml",
    "atomic_directory",
    "check_run_output",
    "prepare_run_dir",
    "strict_json",
    "MetricsWriter",
    "read_metrics",
    "write_error",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: Path, exc: OSError) -> WriteError:
    """One-line :class:`WriteError` for an ``OSError`` met while writing ``path``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else str(path)
    return WriteError(f"cannot write {where}: {reason}")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, so that the JSON the
    tool writes is strict JSON that every parser reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (see :func:`strict_json`); unknown objects as their ``str``."""
    return json.dumps(strict_json(value), indent=indent, default=str, allow_nan=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    :raises WriteError: the file cannot be written (read-only, disk full, not a directory).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented strict JSON."""
    atomic_write_text(path, dumps(data, indent=2) + "\n")


def atomic_write_yaml(path: Path, data: Any) -> None:
    """Atomically write ``data`` as YAML (keys in insertion order)."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


@contextlib.contextmanager
def atomic_directory(final: Path, force: bool = False, not_ours: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final``.

    An existing non-empty ``final`` is refused unless ``force``; with ``force`` it is replaced
    only if ``not_ours`` (when given) finds no reason against it. The old directory is moved aside
    and deleted only once the new one is in place. On failure the temporary directory is removed
    and ``final`` (if it existed) is untouched.

    :raises WriteError: the directory cannot be written.
    """
    if final.is_symlink():
        raise UnsafeOutputError(f"{final} is a symbolic link; refusing to replace it")
    if final.exists():
        if not final.is_dir():
            raise OutputExistsError(f"{final} exists and is not a directory")
        if any(final.iterdir()):
            if not force:
                raise OutputExistsError(f"{final} exists and is not empty; pass {option('force')} to replace it")
            reason = not_ours(final) if not_ours is not None else None
            if reason:
                raise UnsafeOutputError(f"{final} was not written by qlora ({reason}); refusing to replace it even with {option('force')}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise write_error(final, exc) from None
    try:
        yield tmp
        if final.exists():
            aside = move_aside(final)
            os.replace(tmp, final)
            remove_aside(aside)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(final, exc) from None
        raise


def check_run_output(path: Path, force: bool, inputs: Sequence[tuple[str, Path | None]] = ()) -> bool:
    """Raise unless ``path`` may take a new run; True when it holds a previous run to replace.

    A non-empty ``path`` is refused unless ``force``; even with ``force`` only a directory that
    provably holds a qlora run (:func:`~qlora_plugins.core.safety.not_a_run_because`) and none of
    ``inputs`` may be replaced.
    """
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{option('output')}: {path} exists and is not a directory")
    if not path.exists() or not any(path.iterdir()):
        return False
    if not force:
        raise OutputExistsError(
            f"{option('output')}: {path} exists and is not empty; pass {option('force')} to replace it (or {option('resume')} to continue it)"
        )
    reason = not_a_run_because(path)
    if reason:
        raise UnsafeOutputError(
            f"{option('output')}: {path} is not a qlora run directory ({reason}); refusing to delete it even with {option('force')}"
        )
    check_holds_no_input(path, inputs, option("output"))
    return True


def prepare_run_dir(path: Path, force: bool, inputs: Sequence[tuple[str, Path | None]] = ()) -> Path | None:
    """Make ``path`` an empty run directory (:func:`check_run_output` says when it may be); return
    where the previous run was moved aside, to be deleted by the caller once the new run is
    complete (or moved back if the new run leaves nothing to resume), or None."""
    aside = move_aside(path) if check_run_output(path, force, inputs) else None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, path)
        raise WriteError(f"{option('output')}: cannot create {path}: {exc.strerror}") from None
    return aside


class MetricsWriter:
    """Appends one strict-JSON object a line to ``metrics.jsonl``, flushed after each record.

    The file is opened with ``O_NOFOLLOW``: a ``metrics.jsonl`` that is a link is refused, never
    appended through.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            self._handle = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as exc:
            raise write_error(path, exc) from None

    def write(self, record: dict) -> None:
        try:
            self._handle.write(dumps(record) + "\n")
            self._handle.flush()
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an incomplete or unreadable last line ends the list)."""
    records: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
    return records
