"""Helpers for data-format plugins: reading local files, column checks, seeded splits, and the
packing and collating the host does with the examples a format returns (a format that wants
packed or collated examples of its own can call them too)."""

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
    "IGNORE_INDEX",
    "PackingStats",
    "best_fit_decreasing",
    "block_causal_mask",
    "check_data_file",
    "collate",
    "collate_packed",
    "collate_varlen",
    "mixed_counts",
    "pack_examples",
    "read_rows",
    "require_columns",
    "sample_indices",
    "split_indices",
    "summed_token_loss",
    "trained_tokens",
]
