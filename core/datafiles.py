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


def read_rows(path: Path, config_path: str = "data.path") -> Any:
    """Load ``path`` as a ``datasets.Dataset`` (kept in memory; no cache files are written)."""
    builder = check_data_file(path, config_path)
    if builder in ("json", "csv", "text"):
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{config_path}: {path} is not UTF-8 text (byte {exc.start})") from None
    import datasets

    no_rows = DataError(f"{config_path}: {path} has no rows")
    if builder == "parquet" and _parquet_rows(path) == 0:
        raise no_rows  # datasets fails on it with "BatchSize must be greater than 0"
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its errors become our DataError
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, cache_dir=None)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        if "corresponds to no data" in str(exc):  # a header-only csv, blank jsonl, `[]`
            raise no_rows from None
        cause = exc.__cause__ or exc.__context__ or exc
        raise DataError(
            f"{config_path}: cannot parse {path}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        ) from None
    if len(ds) == 0:
        raise no_rows
    return ds


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
