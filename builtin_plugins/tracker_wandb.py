"""Builtin tracker ``wandb``: a Weights & Biases run, offline by default (``WANDB_MODE`` or the
``mode`` option say otherwise), written under ``tracking/wandb/`` of the run directory (``wandb
sync`` uploads it later); the links wandb leaves there are removed when the run ends. Needs ``wandb`` (``pip install 'qlora-plugins[wandb]'``). A resumed run
is a new W&B run whose config records ``qlora.resumed_step``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import attrs

from qlora_plugins import Tracker, TrackerContext, hookimpl
from qlora_plugins.tracking import numeric_metrics

INSTALL = "pip install 'qlora-plugins[wandb]'"
EXIT_CODES = {"completed": 0, "failed": 1, "interrupted": 255}


@attrs.define
class WandbOptions:
    """``project``, ``name`` (default: the run directory's name) and ``mode`` (default:
    ``$WANDB_MODE``, else ``offline``: nothing leaves the machine)."""

    project: str = "qlora"
    name: Optional[str] = None
    mode: Optional[Literal["offline", "online", "disabled"]] = None


class WandbTracker(Tracker):
    """A W&B run, offline by default, under the run directory (tracking/wandb/)."""

    name = "wandb"
    Options = WandbOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._run: Any = None
        self._directory: Optional[Path] = None
        self._hooks: Optional[tuple] = None

    def open(self, context: TrackerContext) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"{exc} ({INSTALL})") from None
        mode = self.options.mode or os.environ.get("WANDB_MODE") or "offline"
        context.directory.mkdir(parents=True, exist_ok=True)
        config = dict(context.config)
        if context.resumed_step is not None:
            config["qlora.resumed_step"] = context.resumed_step
        # wandb.init replaces sys.exit and sys.excepthook and never puts them back: a process
        # that goes on after the run (the Python API, a notebook) must get its own back at close
        self._hooks = (sys.exit, sys.excepthook)
        try:
            self._run = wandb.init(
                project=self.options.project,
                name=self.options.name or context.run_name,
                dir=str(context.directory),
                mode=mode,
                config=config,
                settings=wandb.Settings(silent=True, console="off", symlink=False),
            )
        except BaseException:
            self._restore_hooks()
            raise
        self._directory = context.directory

    def log(self, record: dict) -> None:
        self._run.log(numeric_metrics(record), step=int(record.get("step", 0)))

    def close(self, status: str) -> None:
        try:
            if self._run is not None:
                self._run.finish(exit_code=EXIT_CODES.get(status, 1))
                self._run = None
        finally:
            self._restore_hooks()
        if self._directory is not None:
            remove_links(self._directory)

    def _restore_hooks(self) -> None:
        if self._hooks is not None:
            sys.exit, sys.excepthook = self._hooks
            self._hooks = None


def remove_links(directory: Path) -> None:
    """Remove the symbolic links wandb leaves in its run folder (``logs/debug-core.log`` points
    into ``~/.cache/wandb``): a run directory that holds a link is refused by ``--resume`` and
    ``qlora export`` (docs/security.md). The links are unlinked, never followed."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                path.unlink()


@hookimpl
def register_trackers(register):
    register(WandbTracker)
