"""Helpers for data-format plugins: reading local files, column checks, seeded splits."""

from qlora_plugins.core.datafiles import BUILDERS, check_data_file, read_rows, require_columns, split_indices

__all__ = ["BUILDERS", "check_data_file", "read_rows", "require_columns", "split_indices"]
