"""How messages name the options a user set: one spelling for the Python API, one for the CLI.

The core never writes a command-line flag into a message. Where an error or a progress line names
an option (the output directory, ``force``, ``resume``, an exporter...), it writes
``option("force")``: a marked name. :func:`spell` turns the marks into words for a reader:

- ``str()`` of a :class:`~qlora_plugins.core.errors.QloraError`, and the log lines a
  :class:`~qlora_plugins.core.pipeline.Pipeline` passes to its ``log`` callable, use
  :data:`API_NAMES` (``force=True``, ``output_dir``), the words of the Python API;
- the ``qlora`` command line maps the same names to its flags (``--force``, ``--output``) in one
  table, ``CLI_FLAGS`` in :mod:`qlora_plugins.cli`.

A name missing from a table is written as it is.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

#: Brackets a marked option name. The control character never appears in what a user types
#: into a config or on a command line, and :func:`spell` removes every pair.
MARK = "\x1e"

_MARKED = re.compile(MARK + r"([A-Za-z0-9_.\-]+)" + MARK)

#: The Python API's words for each option name the core marks.
API_NAMES: dict[str, str] = {
    "output": "output_dir",
    "force": "force=True",
    "resume": "resume=True",
    "exporter": "names",
    "option": "options",
    "set": "overrides",
}


def option(name: str) -> str:
    """``name`` marked as an option, for an error message or a log line."""
    return f"{MARK}{name}{MARK}"


def spell(text: str, names: Mapping[str, str] = API_NAMES) -> str:
    """``text`` with each marked option written as ``names`` spells it (the name itself when the
    table has no entry)."""
    if MARK not in text:
        return text
    return _MARKED.sub(lambda m: names.get(m.group(1), m.group(1)), text).replace(MARK, "")


#: A callable that takes one line of progress text.
Log = Callable[[str], Any]


def spelled_log(log: Log) -> Log:
    """``log`` for the core's marked lines: it gets them in API words, unless it was made by
    :func:`log_with_names` (then it gets the marks and spells them itself)."""
    if getattr(log, "spells_options", False):
        return log
    return lambda line: log(spell(line))


def log_with_names(write: Log, names: Mapping[str, str]) -> Log:
    """A log callable that spells marked options with ``names`` before it writes (the CLI's)."""

    def log(line: str) -> Any:
        return write(spell(line, names))

    log.spells_options = True  # type: ignore[attr-defined]
    return log
