"""A third-party tracker for qlora-plugins: ``csv``, the training metrics as rows of a CSV file in
``tracking/csv/`` of the run directory. Written against the public API only: a
:class:`~qlora_plugins.Tracker` subclass with an attrs options class, registered through the
``register_trackers`` hook of an entry point in the ``qlora_plugins`` group."""

from __future__ import annotations

import csv
from typing import Any

import attrs

from qlora_plugins import Tracker, TrackerContext, hookimpl


@attrs.define
class CsvOptions:
    """``columns``: the record keys written, in order; ``filename``: the file in tracking/csv/."""

    columns: list[str] = attrs.field(factory=lambda: ["step", "loss", "lr", "eval_loss"])
    filename: str = "metrics.csv"


class CsvTracker(Tracker):
    """The training metrics as a CSV file (tracking/csv/metrics.csv)."""

    name = "csv"
    Options = CsvOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._file: Any = None
        self._writer: Any = None

    def open(self, context: TrackerContext) -> None:
        context.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(context.directory / self.options.filename, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.options.columns, extrasaction="ignore")
        self._writer.writeheader()

    def log(self, record: dict) -> None:
        self._writer.writerow(record)
        self._file.flush()

    def close(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@hookimpl
def register_trackers(register):
    register(CsvTracker)
