#!/usr/bin/env bash
# One-shot style fix for the whole tree, with the ruff settings in pyproject.toml ([tool.ruff]).
# Meant to be run once by whoever merges the branches of issue 11, then whenever `./dev lint` fails:
#
#   1. ruff check --fix .                          safe fixes: import order (I001), unused imports (F401)
#   2. ruff check --fix --unsafe-fixes --select F841 .
#                                                  drop assignments to unused local variables; ruff keeps
#                                                  the right-hand side when it has side effects (a call)
#   3. ruff format .                               the formatter (line length 140, double quotes)
#   4. ruff check . && ruff format --check .       verify: exits non-zero if something is left for a human
#
# Formatting changes no behaviour (ruff format only rewrites layout: the AST stays the same); the fixes
# of steps 1-2 only delete unused names and reorder imports. Review with `git diff --stat`, run the tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUFF="${RUFF:-ruff}"

echo "fix-style: $($RUFF --version) in $(pwd)" >&2
$RUFF check --fix --exit-zero .
$RUFF check --fix --unsafe-fixes --select F841 --exit-zero .
$RUFF format .
echo "fix-style: verifying" >&2
$RUFF check .
$RUFF format --check .
if command -v git >/dev/null 2>&1 && git rev-parse --git-dir >/dev/null 2>&1; then
    echo "fix-style: $(git diff --name-only | wc -l) file(s) changed (git diff --stat for details)" >&2
fi
