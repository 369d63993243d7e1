"""Progress of the long stages, through one mechanism they all share.

A :class:`Progress` is set for the duration of a command (:func:`use`); a stage opens
``with current().stage("load", total=bytes, unit="B") as stage:`` and calls ``stage.update(n)``
as it goes, from anywhere below (the streaming loader, the evaluation loop, the exporters) without
a progress object being passed down. On a terminal each stage is a progress bar on stderr; with
``--no-progress``, or when stderr is not a terminal, each stage is one line when it ends (what it
did and how long it took). Outside a command (library use) progress is silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Any, Callable, Iterator, Optional

Log = Callable[[str], None]


class Stage:
    """One stage in progress: counts what is done (``update``) and shows it."""

    def __init__(self, name: str, total: Optional[float], unit: str, bar: Any) -> None:
        self.name, self.total, self.unit, self.bar = name, total, unit, bar
        self.done = 0.0
        self.started = time.perf_counter()
        self.postfix: dict[str, Any] = {}

    def update(self, n: float = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Figures shown beside the bar (and in the stage's closing line), e.g. ``loss=``."""
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def summary(self) -> str:
        """The stage's closing line."""
        seconds = time.perf_counter() - self.started
        amount = _amount(self.done, self.unit) if self.done else ""
        extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        parts = [p for p in (amount, extra, f"{seconds:.1f} s") if p]
        return f"{self.name}: done ({', '.join(parts)})"


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        from qlora_plugins.core.report import human_bytes

        return human_bytes(n)
    return f"{int(n):,} {unit}"


class Progress:
    """How a command shows its stages.

    :param bars: show progress bars (a terminal, and no ``--no-progress``).
    :param log: where the one-line summaries go when there are no bars (None: nowhere).
    """

    def __init__(self, bars: bool = False, log: Optional[Log] = None) -> None:
        self.bars, self.log = bars, log

    @classmethod
    def for_terminal(cls, enabled: bool, log: Optional[Log]) -> "Progress":
        """Bars when ``enabled`` and stderr is a terminal; else one line per stage to ``log``."""
        return cls(bars=enabled and sys.stderr.isatty(), log=log)

    @contextlib.contextmanager
    def stage(self, name: str, total: Optional[float] = None, unit: str = "it", initial: float = 0) -> Iterator[Stage]:
        """Show the stage ``name`` while the block runs (``total`` units expected, if known)."""
        bar = None
        if self.bars:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=initial, desc=name, unit=unit, unit_scale=unit == "B", file=sys.stderr, dynamic_ncols=True)
        stage = Stage(name, total, unit, bar)
        token = _current_stage.set(stage)
        try:
            yield stage
        finally:
            _current_stage.reset(token)
            if bar is not None:
                bar.close()
        if bar is None and self.log is not None:
            self.log(stage.summary())


_SILENT = Progress()
_current: contextvars.ContextVar[Progress] = contextvars.ContextVar("qlora_progress", default=_SILENT)
_current_stage: contextvars.ContextVar[Optional[Stage]] = contextvars.ContextVar("qlora_progress_stage", default=None)


def current() -> Progress:
    """The progress of the running command (silent outside one)."""
    return _current.get()


def advance(n: float = 1) -> None:
    """Count ``n`` units done in the innermost open stage (nothing when none is open)."""
    stage = _current_stage.get()
    if stage is not None:
        stage.update(n)


@contextlib.contextmanager
def use(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the current one for the block."""
    token = _current.set(progress)
    try:
        yield progress
    finally:
        _current.reset(token)
