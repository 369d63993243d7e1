"""Helpers for data-format plugins: reading local files, column checks, seeded splits, and the
packing and collating the host does with the examples a format returns (a format that wants
packed or collated examples of its own can call them too), and the tokenization cache (batched
``datasets`` maps kept as memory-mapped Arrow, see docs/data-cache.md)."""

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
from qlora_plugins.core.mixing import mixed_counts, sample_indices
from qlora_plugins.core.packing import (
    IGNORE_INDEX,
    PackingStats,
    best_fit_decreasing,
    block_causal_mask,
    collate_packed,
    collate_varlen,
    pack_examples,
    trained_tokens,
)
from qlora_plugins.core.training import collate, summed_token_loss

__all__ = [
    "BUILDERS",
    "Encoder",
    "Examples",
    "IGNORE_INDEX",
    "NOT_KEYED",
    "PackingStats",
    "TokenizedSet",
    "best_fit_decreasing",
    "block_causal_mask",
    "check_data_file",
    "choose_num_proc",
    "code_fingerprint",
    "collate",
    "collate_packed",
    "collate_varlen",
    "data_cache_dir",
    "mixed_counts",
    "options_fingerprint",
    "pack_examples",
    "read_rows",
    "require_columns",
    "sample_indices",
    "scan_file",
    "split_examples",
    "split_indices",
    "summed_token_loss",
    "tokenize_cached",
    "tokenizer_fingerprint",
    "trained_tokens",
]
