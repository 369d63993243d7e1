"""Helpers for data-format plugins: reading local files, column checks, seeded splits, and the
tokenization cache (batched ``datasets`` maps kept as memory-mapped Arrow, see
docs/data-cache.md)."""

from qlora_plugins.core.data_cache import (
    NOT_KEYED,
    Encoder,
    Examples,
    TokenizedSet,
    choose_num_proc,
    code_fingerprint,
    data_cache_dir,
    options_fingerprint,
    scan_file,
    split_examples,
    tokenize_cached,
    tokenizer_fingerprint,
)
from qlora_plugins.core.datafiles import BUILDERS, check_data_file, read_rows, require_columns, split_indices

__all__ = [
    "BUILDERS",
    "NOT_KEYED",
    "Encoder",
    "Examples",
    "TokenizedSet",
    "check_data_file",
    "choose_num_proc",
    "code_fingerprint",
    "data_cache_dir",
    "options_fingerprint",
    "read_rows",
    "require_columns",
    "scan_file",
    "split_examples",
    "split_indices",
    "tokenize_cached",
    "tokenizer_fingerprint",
]
