"""Builtin tracker ``tensorboard``: TensorBoard event files in ``tracking/tensorboard/`` of the run
directory, one scalar per numeric metric (``loss``, ``lr``, ``eval_loss``, ...) at its step. Needs
the ``tensorboard`` package (``pip install 'qlora-plugins[tensorboard]'``); on ``--resume`` the
events after the resumed step are purged."""

from __future__ import annotations

from typing import Any

import attrs

from qlora_plugins import Tracker, TrackerContext, hookimpl
from qlora_plugins.options import in_range
from qlora_plugins.tracking import numeric_metrics

INSTALL = "pip install 'qlora-plugins[tensorboard]'"


@attrs.define
class TensorBoardOptions:
    """``flush_secs``: how often the event file is flushed to disk (it is always flushed at the end)."""

    flush_secs: int = attrs.field(default=10, validator=in_range(1, 3600))


class TensorBoardTracker(Tracker):
    """TensorBoard event files in the run directory (tracking/tensorboard/)."""

    name = "tensorboard"
    Options = TensorBoardOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._writer: Any = None

    def open(self, context: TrackerContext) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"{exc} ({INSTALL})") from None
        purge = None if context.resumed_step is None else context.resumed_step + 1
        self._writer = SummaryWriter(log_dir=str(context.directory), flush_secs=self.options.flush_secs, purge_step=purge)

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in numeric_metrics(record).items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@hookimpl
def register_trackers(register):
    register(TensorBoardTracker)
