"""Hook specifications: the whole extension surface of qlora-plugins.

Every ``register_*`` hook receives a host-owned ``register`` callable. A plugin calls it once per
class it provides; the host validates the class, records which distribution provided it and
resolves name clashes (see :mod:`qlora_plugins.core.registry`). Hooks are called with keyword
arguments only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

PROJECT_NAME = "qlora_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[type], None]


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantizer classes (subclasses of :class:`qlora_plugins.Quantizer`).

    :param register: call ``register(QuantizerClass)`` for each quantizer the plugin provides.
    """


@hookspec
def register_adapters(register: Register) -> None:
    """Register adapter classes (subclasses of :class:`qlora_plugins.Adapter`).

    :param register: call ``register(AdapterClass)`` for each adapter the plugin provides.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizer classes (subclasses of :class:`qlora_plugins.Optimizer`).

    :param register: call ``register(OptimizerClass)`` for each optimizer the plugin provides.
    """


@hookspec
def register_exporters(register: Register) -> None:
    """Register exporter classes (subclasses of :class:`qlora_plugins.Exporter`).

    :param register: call ``register(ExporterClass)`` for each exporter the plugin provides.
    """


@hookspec
def register_data_formats(register: Register) -> None:
    """Register data format classes (subclasses of :class:`qlora_plugins.DataFormat`).

    :param register: call ``register(DataFormatClass)`` for each data format the plugin provides.
    """


@hookspec
def register_model_sources(register: Register) -> None:
    """Register model sources (subclasses of :class:`qlora_plugins.ModelSource`): named models
    that are materialized into a checkpoint directory on first use, e.g. the tiny default model.

    :param register: call ``register(ModelSourceClass)`` for each model source.
    """


# --- issue 14, generate/eval branch: evaluators ---


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluator classes (subclasses of :class:`qlora_plugins.Evaluator`), run by
    ``qlora eval TARGET --evaluator NAME`` and by a config's ``eval`` section after training.

    :param register: call ``register(EvaluatorClass)`` for each evaluator the plugin provides.
    """


# --- end evaluators ---
# --- trackers (issue 14) -------------------------------------------------------------------


@hookspec
def register_trackers(register: Register) -> None:
    """Register metrics trackers (subclasses of :class:`qlora_plugins.Tracker`): where the
    training metrics go besides ``metrics.jsonl`` (TensorBoard, MLflow, W&B, ...), chosen by the
    config's ``track`` section.

    :param register: call ``register(TrackerClass)`` for each tracker the plugin provides.
    """


# --- end of trackers -------------------------------------------------------------------------


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add subcommands to the ``qlora`` command line.

    :param cli: the root ``click.Group``; decorate new commands with ``@cli.command()``.
    """
