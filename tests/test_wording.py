"""Core messages name options in neutral words; the Python API and the CLI each spell them their way.

The core marks every option it names (``qlora_plugins.core.wording.option``); ``str()`` of an
error uses the API's words, and the CLI maps the same marks to its flags in one table
(``qlora_plugins.cli.CLI_FLAGS``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import assert_user_error, base_config, invoke

from qlora_plugins.api import run
from qlora_plugins.cli import CLI_FLAGS
from qlora_plugins.core.wording import MARK
from qlora_plugins.errors import OutputExistsError, QloraError
from qlora_plugins.testing import make_registry

CORE = Path(__file__).resolve().parent.parent / "core"
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _argv_items(tree: ast.AST) -> set[int]:
    """Flags that are items of a list literal: a command line the core builds for another program
    (torchrun's), not a message."""
    return {
        id(item)
        for node in ast.walk(tree)
        if isinstance(node, ast.List)
        for item in node.elts
        if isinstance(item, ast.Constant) and isinstance(item.value, str) and re.fullmatch(r"--[a-z][a-z-]*", item.value)
    }


def test_core_writes_no_command_line_flag_into_a_message():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstring_nodes(tree) | _argv_items(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip and FLAG.search(node.value):
                offenders.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: {node.value[:60]!r}")
    assert not offenders, "core strings that name a CLI flag (mark the option with wording.option instead):\n" + "\n".join(offenders)


def test_every_option_the_core_marks_has_a_cli_flag():
    marked = set()
    for path in sorted(CORE.rglob("*.py")):
        marked |= set(re.findall(r"""option\(["']([a-z_]+)["']\)""", path.read_text(encoding="utf-8")))
    assert marked, "the core marks no option at all?"
    assert marked <= set(CLI_FLAGS), f"marked options without a CLI spelling: {sorted(marked - set(CLI_FLAGS))}"


@pytest.fixture
def finished_run(tmp_path, write_config):
    config = write_config(base_config(train={"max_steps": 1, "batch_size": 4, "seed": 0}))
    out = tmp_path / "run"
    assert invoke("run", str(config), "-o", str(out), "--no-progress").exit_code == 0
    return config, out


def test_the_api_and_the_cli_word_the_same_refusal_their_own_way(finished_run):
    config, out = finished_run
    from qlora_plugins.api import load_config

    with pytest.raises(OutputExistsError) as info:
        run(load_config(config), make_registry(), out)
    api_text = str(info.value)
    assert "force=True" in api_text and "output_dir" in api_text
    assert "--" not in api_text and MARK not in api_text
    line = assert_user_error(invoke("run", str(config), "-o", str(out), "--no-progress"), "--output", "pass --force")
    assert MARK not in line and "force=True" not in line


def test_render_leaves_unmarked_text_and_unknown_names_alone():
    error = QloraError("a --literal stays; \x1eunknown_thing\x1e is written as it is")
    assert str(error) == "a --literal stays; unknown_thing is written as it is"
    assert error.render(CLI_FLAGS) == str(error)
