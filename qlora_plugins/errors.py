"""Typed exceptions of qlora-plugins (re-exported from the core)."""

from qlora_plugins.core.errors import (
    ConfigError,
    DataError,
    DistributedError,
    EvaluationError,
    ExportError,
    ModelError,
    OutputExistsError,
    PluginError,
    QloraError,
    QuantizationError,
    TargetError,
    TrainingError,
    short_repr,
    short_text,
)

__all__ = [
    "ConfigError",
    "DataError",
    "EvaluationError",
    "DistributedError",
    "ExportError",
    "ModelError",
    "OutputExistsError",
    "PluginError",
    "QloraError",
    "QuantizationError",
    "TargetError",
    "TrainingError",
    "short_repr",
    "short_text",
]
