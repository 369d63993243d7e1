"""The plugin template (examples/plugins/qlora-plugin-template): copied, renamed with its own
``rename.py``, installed with pip and run through ``qlora``, as a plugin author would.

The renamed package is pip-installed into a per-module ``--target`` directory put on PYTHONPATH
of the subprocesses (as tests/test_third_party.py does), so the shared environment is untouched.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, base_config, pip_install_to

TEMPLATE = REPO / "examples" / "plugins" / "qlora-plugin-template"
NEW = "acme-tools"  # -> distribution qlora-acme-tools, package qlora_acme_tools, plugins acme_tools_*


def renamed_copy(dest: Path) -> Path:
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = subprocess.run([sys.executable, "rename.py", NEW], cwd=dest, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dest


def test_the_template_uses_only_the_public_api():
    for path in TEMPLATE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not name.startswith("qlora_plugins.core"), f"{path.name} imports {name}"


def test_rename_replaces_every_spelling(tmp_path):
    src = renamed_copy(tmp_path / "pkg")
    assert (src / "qlora_acme_tools" / "__init__.py").is_file() and not (src / "qlora_myplugin").exists()
    assert (src / "tests" / "test_acme_tools.py").is_file()
    for path in src.rglob("*"):
        if path.is_file() and path.name != "rename.py":
            text = path.read_text(encoding="utf-8")
            assert "myplugin" not in text.lower(), f"{path.relative_to(src)} still says myplugin"
            if path.suffix == ".py":
                ast.parse(text)
    project = (src / "pyproject.toml").read_text(encoding="utf-8")
    assert 'name = "qlora-acme-tools"' in project and 'acme_tools = "qlora_acme_tools"' in project
    module = (src / "qlora_acme_tools" / "__init__.py").read_text(encoding="utf-8")
    assert 'name = "acme_tools_int4"' in module and 'name = "acme_tools_weights"' in module and "class AcmeToolsInt4(" in module
    bad = subprocess.run([sys.executable, "rename.py", "Not A Name"], cwd=src, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a usable name" in bad.stderr


@pytest.fixture(scope="module")
def template_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    src = renamed_copy(root / "src")
    site = pip_install_to(src, root / "site")
    (info,) = site.glob("qlora_acme_tools-*.dist-info")
    assert "acme_tools = qlora_acme_tools" in (info / "entry_points.txt").read_text()
    return site


def run(site: Path, *args: object, cwd: Path | None = None, module: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QLORA_PLUGINS_DISABLE_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", module] if module else [sys.executable, "-c", "from qlora_plugins.cli import main; main()"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd or Path.cwd(), timeout=600)


@pytest.mark.slow
def test_renamed_template_installs_and_runs(template_site, tmp_path, tiny_llama_dir):
    listed = run(template_site, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["broken"] == []
    mine = {p["name"]: p for p in data["plugins"] if p["distribution"] == "qlora-acme-tools"}
    assert {name: p["kind"] for name, p in mine.items()} == {"acme_tools_int4": "quantizer", "acme_tools_weights": "exporter"}
    assert mine["acme_tools_int4"]["version"] == "0.1.0" and mine["acme_tools_int4"]["class"] == "qlora_acme_tools.AcmeToolsInt4"

    config = tmp_path / "run.yaml"
    sections = base_config(
        quantizer={"name": "acme_tools_int4", "blocksize": 64},
        export=[{"name": "adapter"}, {"name": "acme_tools_weights", "dtype": "float16"}],
    )
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    out = run(template_site, "run", config, "-o", tmp_path / "run", "--json", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["plugins"]["quantizer"]["distribution"] == "qlora-acme-tools"
    assert report["quantization"]["quantized_params"] > 0 and report["training"]["steps"] == 3
    export = report["exports"]["acme_tools_weights"]
    assert export["fidelity"]["status"] == "passed" and export["fidelity"]["tensor_rel_error"] <= 1e-3
    assert export["tensors"] > 0 and export["dtype"] == "float16"
    written = tmp_path / "run" / "exports" / "acme_tools_weights"
    assert sorted(p.name for p in written.iterdir()) == ["manifest.json", "weights.safetensors"]

    # the exporter's own tolerance option is validated and enforced
    bad = run(template_site, "validate", config, "--set", "export.1.tolerance.max_tensor_rel_error=-1")
    assert bad.returncode == 2 and "max_tensor_rel_error" in bad.stderr


@pytest.mark.slow
def test_renamed_template_passes_its_own_tests(template_site, tmp_path):
    src = tmp_path / "pkg"
    renamed_copy(src)
    out = run(template_site, "-q", "-p", "no:cacheprovider", str(src / "tests"), cwd=src, module="pytest")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
