"""Reading local data files (json, jsonl, csv, parquet, plain text) through ``datasets``,
with errors that name the file, and a seeded train/eval split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from qlora_plugins.core.errors import DataError, short_text

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def check_data_file(path: Path, config_path: str = "data.path") -> str:
    """Raise DataError unless ``path`` is a readable file of a supported type; return its builder."""
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise DataError(f"{config_path}: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None
    if not exists:
        raise DataError(f"{config_path}: data file not found: {path}")
    if not is_file:
        raise DataError(f"{config_path}: not a file: {path}")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{config_path}: {path.name}: unsupported file type '{path.suffix}'; use one of {', '.join(sorted(BUILDERS))}")
    if path.stat().st_size == 0:
        raise DataError(f"{config_path}: {path} is empty")
    return builder


def is_text_builder(builder: str) -> bool:
    """Whether files of this ``datasets`` builder are text (checked to be UTF-8)."""
    if builder in ("json", "csv", "text"):
        return True
    return False


def read_rows(path: Path, config_path: str = "data.path", cache_dir: Path | None = None) -> Any:
    """Load ``path`` as a ``datasets.Dataset``.

    The file is streamed, never read whole: the UTF-8 check decodes it chunk by chunk, and with
    ``cache_dir`` the rows are converted into memory-mapped Arrow files there (without it they
    are kept in memory, for small files). A parse error in a JSON-lines file names the line.
    """
    builder = check_data_file(path, config_path)
    if is_text_builder(builder):
        from qlora_plugins.core.data_cache import scan_file

        scan_file(path, config_path, utf8=True)
    import datasets

    no_rows = DataError(f"{config_path}: {path} has no rows")
    if builder == "parquet" and _parquet_rows(path) == 0:
        raise no_rows  # datasets fails on it with "BatchSize must be greater than 0"
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its errors become our DataError
    datasets.disable_progress_bars()
    where = {"keep_in_memory": True, "cache_dir": None} if cache_dir is None else {"keep_in_memory": False, "cache_dir": str(cache_dir)}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **where)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        if "corresponds to no data" in str(exc):  # a header-only csv, blank jsonl, `[]`
            raise no_rows from None
        located = _json_lines_error(path) if builder == "json" else None
        if located:
            raise DataError(f"{config_path}: cannot parse {path}: {located}") from None
        cause = exc.__cause__ or exc.__context__ or exc
        raise DataError(
            f"{config_path}: cannot parse {path}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        ) from None
    if len(ds) == 0:
        raise no_rows
    return ds


def _json_lines_error(path: Path) -> str | None:
    """``line N: <what>`` for the first line of a JSON-lines file that is not a JSON object,
    read line by line; None when every line is one (or the file is one JSON document)."""
    import json

    with open(path, "rb") as handle:
        if path.suffix.lower() != ".jsonl":  # a .json file: JSON lines only when its first line is an object
            try:
                if not isinstance(json.loads(handle.readline()), dict):
                    return None
            except ValueError:
                return None
            handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {number}: {type(exc).__name__}: {short_text(exc, 200)}"
            if not isinstance(value, dict):
                return f"line {number}: expected a JSON object, got {short_text(line.strip(), 60)}"
    return None


def _parquet_rows(path: Path) -> int | None:
    """Row count from the parquet footer, or None if it cannot be read (datasets will say why)."""
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(path)).metadata.num_rows
    except Exception:
        return None


def require_columns(ds: Any, columns: Sequence[str], path: Path, config_path: str = "data.path") -> None:
    """Raise DataError naming the missing columns and the ones present."""
    missing = [short_text(c) for c in columns if c not in ds.column_names]
    if missing:
        present = short_text(", ".join(ds.column_names), 400) or "none"
        raise DataError(f"{config_path}: {path.name} lacks column(s) {', '.join(missing)}; it has: {present}")


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle of ``range(n)`` split into (train, eval); eval gets at least one row when
    ``eval_fraction > 0`` and ``n >= 2``."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, min(n_eval, n - 1))
    return order[n_eval:], order[:n_eval]
