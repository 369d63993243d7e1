"""What evaluator authors and ``qlora eval`` need: running evaluators on a model and its base
side by side, the results table, and scoring helpers (token-weighted NLL, perplexity)."""

from qlora_plugins.core.evaluation import (
    LABELS,
    as_is,
    check_evaluators,
    format_results,
    run_evaluators,
    sequence_nll,
    table_rows,
    token_weighted_perplexity,
)

__all__ = [
    "LABELS",
    "as_is",
    "check_evaluators",
    "format_results",
    "run_evaluators",
    "sequence_nll",
    "table_rows",
    "token_weighted_perplexity",
]
