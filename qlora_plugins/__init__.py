"""qlora-plugins: QLoRA fine-tuning as swappable plugins.

The public surface for plugin authors: the ``hookimpl`` marker and the typed plugin base classes.
Heavy libraries (torch, transformers, peft, bitsandbytes) are imported lazily by the code that
needs them, so importing this package is cheap.
"""

from qlora_plugins.core.hookspecs import hookimpl
from qlora_plugins.core.interfaces import (
    Adapter,
    AdapterContext,
    DataContext,
    DataFormat,
    DataOptions,
    DataSplits,
    EvalContext,
    Evaluator,
    ExportCheck,
    ExportContext,
    Exporter,
    Footprint,
    MergeTarget,
    ModelRequest,
    ModelSource,
    NoOptions,
    Optimizer,
    OptimizerOptions,
    Plugin,
    Quantizer,
    SavedAdapter,
    Tracker,
    TrackerContext,
)

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterContext",
    "DataContext",
    "DataFormat",
    "DataOptions",
    "DataSplits",
    "EvalContext",
    "Evaluator",
    "ExportCheck",
    "ExportContext",
    "Exporter",
    "Footprint",
    "MergeTarget",
    "ModelRequest",
    "ModelSource",
    "NoOptions",
    "Optimizer",
    "OptimizerOptions",
    "Plugin",
    "Quantizer",
    "SavedAdapter",
    "Tracker",
    "TrackerContext",
    "hookimpl",
    "__version__",
]
