#!/usr/bin/env python3
"""Turn this template into your own package: ``python rename.py NEW_NAME``.

NEW_NAME is lowercase letters and digits, words joined by ``-`` or ``_`` (``acme``, ``acme-quant``).
Every spelling of the placeholder ``myplugin`` in the package's text files and file names is
replaced (this script itself is left as it is; delete it afterwards):

=====================  ==========================  ==================================
what                   template                    after ``rename.py acme-quant``
=====================  ==========================  ==================================
distribution           ``qlora-myplugin``          ``qlora-acme-quant``
import package         ``qlora_myplugin``          ``qlora_acme_quant``
entry-point name       ``myplugin``                ``acme_quant``
plugin names           ``myplugin_int4``, ...      ``acme_quant_int4``, ...
class names            ``MyPluginInt4``, ...       ``AcmeQuantInt4``, ...
test file              ``tests/test_myplugin.py``  ``tests/test_acme_quant.py``
=====================  ==========================  ==================================
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PLACEHOLDER = "myplugin"
TEXT_SUFFIXES = {".py", ".toml", ".md", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json"}
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".venv"}
NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


def replacements(new: str) -> list[tuple[str, str]]:
    """(old, new) pairs, the most specific first."""
    words = re.split(r"[-_]", new)
    under, dash, camel = "_".join(words), "-".join(words), "".join(w.capitalize() for w in words)
    return [
        (f"qlora-{PLACEHOLDER}", f"qlora-{dash}"),
        (f"qlora_{PLACEHOLDER}", f"qlora_{under}"),
        ("MyPlugin", camel),
        (PLACEHOLDER, under),
    ]


def rename(root: Path, new: str) -> list[Path]:
    """Rename the template in ``root`` to ``new``; return the files changed or moved."""
    if not NAME.fullmatch(new) or new.replace("-", "_") == PLACEHOLDER:
        raise ValueError(f"{new!r} is not a usable name: lowercase letters and digits, words joined by '-' or '_'")
    pairs = replacements(new)
    me = Path(__file__).resolve()
    changed: list[Path] = []
    paths = [p for p in root.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    for path in paths:
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.resolve() != me:
            text = path.read_text(encoding="utf-8")
            updated = text
            for old, replacement in pairs:
                updated = updated.replace(old, replacement)
            if updated != text:
                path.write_text(updated, encoding="utf-8")
                changed.append(path)
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if PLACEHOLDER in path.name and path.resolve() != me:
            target = path.with_name(path.name.replace(PLACEHOLDER, pairs[-1][1]))
            path.rename(target)
            changed.append(target)
    return changed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent
    try:
        changed = rename(root, argv[0])
    except ValueError as exc:
        print(f"rename.py: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(path.relative_to(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
