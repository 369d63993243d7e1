"""Typed exceptions raised by qlora-plugins.

Every error a user can cause derives from :class:`QloraError`; the CLI prints its message on one
line and exits with code 2. Anything else is a bug and gets a traceback.
"""

from __future__ import annotations


class QloraError(Exception):
    """Base class of every error caused by input (configs, files, plugins), not by a bug."""


class ConfigError(QloraError):
    """A config value is missing, of the wrong type, out of range or unknown.

    :param path: dotted config path, e.g. ``quantizer.blocksize``.
    :param message: what is wrong, phrased so that ``f"{path}: {message}"`` reads well.
    """

    def __init__(self, path: str, message: str, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")


class PluginError(QloraError):
    """A plugin is unknown, broken, or raised while doing its job."""


class PluginConflictError(PluginError):
    """Two plugins registered the same name and neither declared that it replaces the other."""


class ModelError(QloraError):
    """A model directory is missing, is not a model, or cannot be loaded."""


class DataError(QloraError):
    """A dataset file is missing, empty, malformed or lacks the needed columns."""


class QuantizationError(QloraError):
    """A weight cannot be quantized (NaN/Inf, empty, unsupported dtype); names the layer."""


class TrainingError(QloraError):
    """Training cannot start or had to stop (nothing trainable, NaN loss, ...)."""


class ExportError(QloraError):
    """An export failed or its fidelity check exceeded the tolerance."""


class OutputExistsError(QloraError):
    """An output directory is not empty and ``--force`` was not given."""


class WriteError(QloraError):
    """A file or directory could not be written (read-only file system, disk full, not a
    directory); the message names the path."""


class UnsafeOutputError(QloraError):
    """A write, replacement or deletion was refused because it could lose data that this tool did
    not provably write, or leave its directory through a link."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (what Slurm and Kubernetes send before killing a job).

    A subclass of :class:`KeyboardInterrupt`, so every place that saves a checkpoint and marks
    the run interrupted on Ctrl-C does the same on SIGTERM."""
