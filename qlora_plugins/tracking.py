"""Helpers for tracker plugins (the ``track`` config section; docs/trackers.md): the base class
and its context, and the ``metrics.jsonl`` reader and writer that the builtin ``jsonl`` tracker
uses."""

from qlora_plugins.core.interfaces import Tracker, TrackerContext
from qlora_plugins.core.rundir import MetricsWriter, atomic_write_text, dumps, read_metrics
from qlora_plugins.core.tracking import TRACKING_DIR, is_metrics_process, numeric_metrics

__all__ = [
    "TRACKING_DIR",
    "MetricsWriter",
    "Tracker",
    "TrackerContext",
    "atomic_write_text",
    "dumps",
    "is_metrics_process",
    "numeric_metrics",
    "read_metrics",
]
