"""Builtin tracker ``jsonl``: the run directory's ``metrics.jsonl``, one strict-JSON object a line,
flushed after each record. It is the kind's default and always runs (the loss plot, ``--resume``
and the report read the file), and it is essential: a write error fails the run, as any write
into the run directory does."""

from __future__ import annotations

from typing import Any, Optional

from qlora_plugins import Tracker, TrackerContext, hookimpl
from qlora_plugins.tracking import MetricsWriter, atomic_write_text, dumps, read_metrics

FILENAME = "metrics.jsonl"


def truncate_metrics(path: Any, step: int) -> None:
    """Keep only the records of steps up to ``step`` (resuming from its checkpoint: no gaps, no
    duplicates)."""
    kept = [r for r in read_metrics(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in kept))


class JsonlTracker(Tracker):
    """metrics.jsonl in the run directory (always on)."""

    name = "jsonl"
    default = True
    essential = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._writer: Optional[MetricsWriter] = None

    def open(self, context: TrackerContext) -> None:
        path = context.run_dir / FILENAME
        if context.resumed_step is not None:
            truncate_metrics(path, context.resumed_step)
        self._writer = MetricsWriter(path)

    def log(self, record: dict) -> None:
        assert self._writer is not None, "log() before open()"
        self._writer.write(record)

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@hookimpl
def register_trackers(register):
    register(JsonlTracker)
