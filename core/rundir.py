"""The run directory and atomic file writes.

Files are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written file; directories produced in one go (exports) are built in a temporary sibling
directory and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from qlora_plugins.core.errors import OutputExistsError, QloraError

RUN_MARKER = "run.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_yaml(path: Path, data: Any) -> None:
    """Atomically write ``data`` as YAML (keys in insertion order)."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


@contextlib.contextmanager
def atomic_directory(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final``.

    An existing non-empty ``final`` is refused unless ``force``; on failure the temporary directory
    is removed and ``final`` (if it existed) is untouched.
    """
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not force:
        raise OutputExistsError(f"{final} exists and is not empty; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_run_dir(path: Path, force: bool) -> None:
    """Create an empty run directory at ``path``.

    A non-empty ``path`` is refused unless ``force``; even with ``force`` only a previous run
    directory (it holds ``run.json``) is cleared, never an arbitrary directory.
    """
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError(f"--output: {path} exists and is not a directory")
        if any(path.iterdir()):
            if not force:
                raise OutputExistsError(f"--output: {path} exists and is not empty; pass --force to replace it")
            if not (path / RUN_MARKER).is_file():
                raise OutputExistsError(f"--output: {path} is not a qlora run directory (no {RUN_MARKER}); refusing to delete it even with --force")
            shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QloraError(f"--output: cannot create {path}: {exc.strerror}") from None


class MetricsWriter:
    """Appends one JSON object a line to ``metrics.jsonl``, flushed after each record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an incomplete last line is ignored)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records
