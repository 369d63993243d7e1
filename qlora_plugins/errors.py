"""Typed exceptions of qlora-plugins (re-exported from the core)."""

from qlora_plugins.core.errors import (
    ConfigError,
    DataError,
    DistributedError,
    ExportError,
    ModelError,
    OutputExistsError,
    PluginError,
    QloraError,
    QuantizationError,
    TrainingError,
    short_repr,
    short_text,
)

__all__ = [
    "ConfigError",
    "DataError",
    "DistributedError",
    "ExportError",
    "ModelError",
    "OutputExistsError",
    "PluginError",
    "QloraError",
    "QuantizationError",
    "TrainingError",
    "short_repr",
    "short_text",
]
