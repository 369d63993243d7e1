"""The run's metrics trackers (the config's ``track`` section) as one fan-out.

:class:`Trackers` opens every tracker, hands each metrics record to all of them and closes them.
A tracker that raises (in ``open``, which is where a missing client library shows up, in ``log``
or in ``close``) is reported once, one warning line through the pipeline's log and a note in the
report, and disabled for the rest of the run; the run goes on. An ``essential`` tracker (the run
directory's own ``metrics.jsonl``) is the exception: its failure is the run's. Interrupts
(Ctrl-C, SIGTERM) always propagate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from qlora_plugins.core.interfaces import Tracker, TrackerContext

#: Where trackers that write files write them, inside the run directory.
TRACKING_DIR = "tracking"


def is_metrics_process() -> bool:
    """Whether this process writes the run's metrics: always, except on the ranks other than 0
    of a ``torchrun``-style launch (``RANK`` set to something else than 0)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def numeric_metrics(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record other than its ``step`` (booleans and strings are
    not figures): what a tracker plots."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Trackers:
    """Every tracker of the run, opened together (see the module docstring).

    :param trackers: the tracker instances, in the ``track`` section's order.
    :param describe: ``describe(tracker)`` says where a tracker comes from (its distribution),
        for the warning line.
    :param log: where the warning lines go.
    """

    def __init__(self, trackers: list[Tracker], describe: Callable[[Tracker], str] = lambda t: "", log: Callable[[str], None] = print):
        self._active: list[Tracker] = list(trackers)
        self._describe, self._log = describe, log
        self.warnings: list[str] = []

    def _failed(self, tracker: Tracker, stage: str, exc: Exception) -> None:
        where = self._describe(tracker)
        line = (
            f"Warning: tracker '{tracker.name}'{f' ({where})' if where else ''} failed in {stage} and is disabled "
            f"for the rest of the run: {type(exc).__name__}: {_first_line(exc)}"
        )
        self.warnings.append(line)
        self._log(line)
        self._active = [t for t in self._active if t is not tracker]

    def _each(self, stage: str, call: Callable[[Tracker], Any]) -> None:
        for tracker in list(self._active):
            if tracker.essential:
                call(tracker)
                continue
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker never takes the run down with it
                self._failed(tracker, stage, exc)

    def open(self, run_dir: Path, config: dict, resumed_step: int | None = None) -> "Trackers":
        """Open every tracker for the run in ``run_dir``."""

        def one(tracker: Tracker) -> None:
            directory = Path(run_dir) / TRACKING_DIR / tracker.name
            tracker.open(TrackerContext(Path(run_dir), directory, config, resumed_step, Path(run_dir).name))

        self._each("open", one)
        return self

    def log(self, record: dict) -> None:
        """Hand one metrics record to every active tracker (each gets its own copy)."""
        self._each("log", lambda t: t.log(dict(record)))

    def close(self, status: str) -> None:
        """Close every active tracker; nothing is logged afterwards."""
        self._each("close", lambda t: t.close(status))
        self._active = []

    @property
    def active(self) -> list[str]:
        """Names of the trackers still active."""
        return [t.name for t in self._active]
