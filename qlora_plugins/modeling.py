"""Model helpers for plugin authors: linear-layer traversal, module replacement, dtypes, the
checkpoint's tokenizer as a run loads it."""

from qlora_plugins.core.modeling import (
    DEFAULT_SKIP_MODULES,
    auto_class,
    count_parameters,
    is_skipped,
    iter_linear_layers,
    load_tokenizer,
    set_submodule,
    torch_dtype,
)

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "auto_class",
    "count_parameters",
    "is_skipped",
    "iter_linear_layers",
    "load_tokenizer",
    "set_submodule",
    "torch_dtype",
]
