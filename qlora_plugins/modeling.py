"""Model helpers for plugin authors: linear-layer traversal, module replacement, dtypes."""

from qlora_plugins.core.modeling import (
    DEFAULT_SKIP_MODULES,
    auto_class,
    count_parameters,
    is_skipped,
    iter_linear_layers,
    set_submodule,
    torch_dtype,
)

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "auto_class",
    "count_parameters",
    "is_skipped",
    "iter_linear_layers",
    "set_submodule",
    "torch_dtype",
]
