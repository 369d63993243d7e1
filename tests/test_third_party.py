"""A real third-party plugin package, examples/plugins/qlora-lion, installed with pip and found
through its `qlora_plugins` entry point by the `qlora` command in a fresh process.

pip installs it into a per-test-session target directory put on PYTHONPATH of the subprocesses,
which is what an installed distribution looks like to ``importlib.metadata`` (a ``*.dist-info``
with ``entry_points.txt``), without changing the shared environment that other test sessions may
be using at the same time; it is removed with the tmp dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, base_config, install_example

PACKAGE = REPO / "examples" / "plugins" / "qlora-lion"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lion_site(tmp_path_factory) -> Path:
    site = install_example(PACKAGE, tmp_path_factory.mktemp("lion"))
    infos = list(site.glob("qlora_lion-*.dist-info"))
    assert infos and "lion = qlora_lion" in (infos[0] / "entry_points.txt").read_text()
    return site


def qlora(site: Path, *args, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QLORA_PLUGINS_DISABLE_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(env_extra or {})
    code = "from qlora_plugins.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd or Path.cwd(), timeout=600
    )


def test_installed_plugin_is_listed(lion_site):
    out = qlora(lion_site, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (lion,) = [p for p in data["plugins"] if p["name"] == "lion"]
    assert lion["kind"] == "optimizer"
    assert lion["distribution"] == "qlora-lion" and lion["version"] == "0.1.0"
    assert lion["builtin"] is False and lion["class"] == "qlora_lion.Lion"
    assert lion["description"].startswith("Lion: sign-momentum optimizer")
    assert data["broken"] == []
    assert {"nf4", "lora", "paged_adamw"} <= {p["name"] for p in data["plugins"]}

    table = qlora(lion_site, "plugins", "--kind", "optimizer")
    (row,) = [line for line in table.stdout.splitlines() if line.split()[1] == "lion"]
    assert row.split()[:4] == ["optimizer", "lion", "qlora-lion", "0.1.0"]


def test_autoload_off_and_blocking_hide_it(lion_site):
    off = qlora(lion_site, "plugins", "--json", env_extra={"QLORA_PLUGINS_DISABLE_AUTOLOAD": "1"})
    assert "lion" not in {p["name"] for p in json.loads(off.stdout)["plugins"]}
    blocked = json.loads(qlora(lion_site, "--block", "lion", "plugins", "--json").stdout)
    assert "lion" not in {p["name"] for p in blocked["plugins"]} and blocked["blocked"] == ["lion"]


def test_installed_plugin_runs_in_a_pipeline(lion_site, tmp_path, tiny_llama_dir):
    config = tmp_path / "lion.yaml"
    config.write_text(yaml.safe_dump(base_config(train={"max_steps": 3, "batch_size": 4})), encoding="utf-8")
    out = qlora(
        lion_site,
        "run",
        config,
        "--set",
        "optimizer.name=lion",
        "--set",
        "optimizer.lr=3e-4",
        "-o",
        tmp_path / "run",
        "--json",
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    optimizer = report["plugins"]["optimizer"]
    assert optimizer["name"] == "lion" and optimizer["distribution"] == "qlora-lion" and optimizer["version"] == "0.1.0"
    assert optimizer["options"]["lr"] == pytest.approx(3e-4) and optimizer["options"]["betas"] == [0.9, 0.99]
    assert report["training"]["steps"] == 3
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["optimizer"]["name"] == "lion"

    # the plugin's own options class validates, and typos of its name get a suggestion
    bad = qlora(lion_site, "validate", config, "--set", "optimizer.name=lion", "--set", "optimizer.lr=2")
    assert bad.returncode == 2 and "optimizer.lr: must be in [0.0, 1.0], got 2.0" in bad.stderr
    typo = qlora(lion_site, "validate", config, "--set", "optimizer.name=lino")
    assert typo.returncode == 2
    assert typo.stderr.strip().startswith("Error:") and "did you mean 'lion'?" in typo.stderr
