"""Packaging: the installed package imports from outside the repository under the single
``qlora_plugins`` namespace (nothing named ``core`` at the top level), and a built wheel holds
``qlora_plugins/core`` and ``qlora_plugins/builtin_plugins`` and no top-level ``core/``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


def python_outside_repo(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_installed_package_imports_from_outside_the_repo(tmp_path):
    out = python_outside_repo(
        "import qlora_plugins, qlora_plugins.core, qlora_plugins.builtin_plugins, qlora_plugins.cli, "
        "qlora_plugins.core.registry; print(qlora_plugins.core.__file__); "
        "print(qlora_plugins.core.registry.create_registry(load_entrypoints=False).names('quantizer'))",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    core_file, names = out.stdout.strip().splitlines()
    assert core_file.endswith("__init__.py") and "core" in core_file
    assert "nf4" in names


@pytest.mark.parametrize("name", ["core", "builtin_plugins"])
def test_nothing_is_installed_at_the_top_level(name, tmp_path):
    out = python_outside_repo(f"import {name}", tmp_path)
    assert out.returncode != 0 and f"No module named '{name}'" in out.stderr


def _source_tree(dest) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, copied to ``dest`` (so the
    build never writes into the repository others are working in)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    src = tmp_path / "src"
    _source_tree(src)
    wheels = tmp_path / "wheels"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = wheels.glob("qlora_plugins-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qlora_plugins/__init__.py" in names and "qlora_plugins/cli.py" in names
    assert "qlora_plugins/core/registry.py" in names and "qlora_plugins/core/hookspecs.py" in names
    assert "qlora_plugins/builtin_plugins/__init__.py" in names
    assert any(n.startswith("qlora_plugins/builtin_plugins/") and n.endswith(".py") and "__init__" not in n for n in names)
    tops = {n.split("/")[0] for n in names}
    assert "core" not in tops and "builtin_plugins" not in tops and "tests" not in tops
    assert tops <= {"qlora_plugins"} | {n for n in tops if n.endswith(".dist-info")}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "qlora = qlora_plugins.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
