"""Typed exceptions raised by qlora-plugins.

Every error a user can cause derives from :class:`QloraError`; the CLI prints its message on one
line and exits with code 2. Anything else is a bug and gets a traceback.
"""

from __future__ import annotations

from typing import Mapping

from qlora_plugins.core.wording import API_NAMES, spell


def short_text(text: object, limit: int = 80) -> str:
    """``str(text)`` cut to at most ``limit`` characters (``...`` marks the cut), for names and
    other user text quoted in an error message."""
    text = str(text) if not isinstance(text, str) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Longest config file name quoted in a ConfigError (longer ones keep their start and end).
SOURCE_LIMIT = 1024


class QloraError(Exception):
    """Base class of every error caused by input (configs, files, plugins), not by a bug.

    Options named in the message are marked (:func:`qlora_plugins.core.wording.option`):
    ``str(error)`` spells them as the Python API does, :meth:`render` as a front end does (the
    CLI writes its flags)."""

    def render(self, names: Mapping[str, str]) -> str:
        """The message with marked options spelled by ``names``."""
        return spell(Exception.__str__(self), names)

    def __str__(self) -> str:
        return self.render(API_NAMES)


class ConfigError(QloraError):
    """A config value is missing, of the wrong type, out of range or unknown.

    :param path: dotted config path, e.g. ``quantizer.blocksize``.
    :param message: what is wrong, phrased so that ``f"{path}: {message}"`` reads well.
    """

    def __init__(self, path: str, message: str, source: str | None = None) -> None:
        self.path = spell(path)  # (API words; the message keeps the marks for front ends)
        self.message = spell(message)
        self.source = source
        if source and len(source) > SOURCE_LIMIT:
            source = source[: SOURCE_LIMIT // 2] + "..." + source[-SOURCE_LIMIT // 2 :]
        where = f"{source}: " if source else ""
        shown = short_text(path, 200)  # (a dotted path built from user keys can be long)
        super().__init__(f"{where}{shown}: {message}" if path else f"{where}{message}")


class PluginError(QloraError):
    """A plugin is unknown, broken, or raised while doing its job."""


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
    """An output directory is not empty and replacing it (``force``) was not asked for."""


class WriteError(QloraError):
    """A file or directory could not be written (read-only file system, disk full, not a
    directory); the message names the path."""


class UnsafeOutputError(QloraError):
    """A write, replacement or deletion was refused because it could lose data that this tool did
    not provably write, or leave its directory through a link."""


# --- issue 14, generate/eval branch ---


class TargetError(QloraError):
    """A ``qlora generate``/``chat``/``eval`` target is not a run directory, an export or a model
    directory, or cannot be loaded for generation."""


class EvaluationError(QloraError):
    """An evaluator was given bad input (a missing or malformed file, an unknown task) or its
    optional library is not installed."""


# --- end generate/eval ---
class DistributedError(QloraError):
    """A distributed run failed on one rank (the message names it), or cannot start (the launch
    options, the process group)."""


class QuietExit(QloraError):
    """A rank other than 0 stops because of an input error that rank 0 reports: exit code 2
    without a line of its own, so a refusal reads once, not once per process."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (what Slurm and Kubernetes send before killing a job).

    A subclass of :class:`KeyboardInterrupt`, so every place that saves a checkpoint and marks
    the run interrupted on Ctrl-C does the same on SIGTERM."""


#: Longest rendering of a user value inside an error message (:func:`short_repr`).
REPR_LIMIT = 80


def short_repr(value: object, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, for quoting user values in errors.

    It never walks more of ``value`` than it prints: containers are rendered item by item until
    the budget is spent, so a structure that a YAML alias bomb expands to (exponentially many
    items, or a self-referencing list) costs no more than a short one. Huge integers and
    unknown objects are described instead of being converted.
    """
    out: list[str] = []
    budget = [limit + 1]  # one more than fits, so that cutting is detectable

    def emit(text: str) -> bool:
        if budget[0] <= 0:
            return False
        out.append(text[: budget[0]])
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(item: object, depth: int) -> bool:
        if isinstance(item, bool) or item is None or isinstance(item, float):
            return emit(repr(item))
        if isinstance(item, int):
            return emit(repr(item) if item.bit_length() <= 256 else f"<an integer of {item.bit_length()} bits>")
        if isinstance(item, (str, bytes)):
            return emit(repr(item[: limit + 1]))
        if isinstance(item, (list, tuple, dict)):
            if depth > 20:
                return emit("...")
            opening, closing = "{}" if isinstance(item, dict) else "()" if isinstance(item, tuple) else "[]"
            if not emit(opening):
                return False
            items = item.items() if isinstance(item, dict) else item
            for i, entry in enumerate(items):
                if i and not emit(", "):
                    return False
                if isinstance(item, dict):
                    key, val = entry
                    if not (walk(key, depth + 1) and emit(": ") and walk(val, depth + 1)):
                        return False
                elif not walk(entry, depth + 1):
                    return False
            return emit("," + closing if isinstance(item, tuple) and len(item) == 1 else closing)
        return emit(f"<{type(item).__name__}>")

    walk(value, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."
