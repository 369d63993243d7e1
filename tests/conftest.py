"""Shared fixtures: an isolated plugin home with the tiny models materialized once per session,
fresh registries, small configs, a CLI runner and fake installed distributions.

Every test runs with entry-point autoload off (``QLORA_PLUGINS_DISABLE_AUTOLOAD=1``) so that
whatever else is installed in the environment cannot change the results; the tests that are about
entry points switch it back on for themselves.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

# Without a GPU the Triton kernels are checked in Triton's CPU interpreter, which must be switched
# on before triton is first imported (tests/test_triton_kernels.py).
if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
INSTRUCTIONS = DATA / "instructions.jsonl"
CLASSIFY = DATA / "classify.csv"
CORPUS = DATA / "corpus.txt"


@pytest.fixture(scope="session", autouse=True)
def qlora_home(tmp_path_factory: pytest.TempPathFactory):
    """``QLORA_PLUGINS_HOME`` in a session tmp dir (tiny models are created there once) and no
    entry-point autoload, blocking or debug settings leaking in from the caller's environment."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("qlora-home")
    mp.setenv("QLORA_PLUGINS_HOME", str(home))
    mp.setenv("QLORA_PLUGINS_DISABLE_AUTOLOAD", "1")
    mp.delenv("QLORA_PLUGINS_BLOCK", raising=False)
    mp.delenv("QLORA_DEBUG", raising=False)
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield home
    mp.undo()


def new_registry(**kwargs: Any):
    """A fresh registry of the builtins (and ``plugins=``), never the installed entry points."""
    from qlora_plugins.core.registry import create_registry

    kwargs.setdefault("load_entrypoints", False)
    return create_registry(**kwargs)


@pytest.fixture
def registry():
    return new_registry()


def _materialize(name: str) -> Path:
    from qlora_plugins.core.sources import materialize_source

    return materialize_source(new_registry(), name)


@pytest.fixture(scope="session")
def tiny_llama_dir(qlora_home) -> Path:
    return _materialize("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(qlora_home) -> Path:
    return _materialize("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_bert_dir(qlora_home) -> Path:
    return _materialize("tiny-bert")


def base_config(**sections: Any) -> dict:
    """A small, fast run config (tiny-llama, nf4, LoRA r=4, adamw, the tests' instruction data);
    keyword arguments replace whole sections (``None`` removes one)."""
    config = {
        "model": {"source": "tiny-llama"},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", "r": 4, "alpha": 8},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "data": {"name": "instruction", "path": str(INSTRUCTIONS), "max_length": 64, "eval_fraction": 0.1},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 0},
        "export": [{"name": "adapter"}],
    }
    for key, value in sections.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config mapping (YAML, or TOML for a ``.toml`` name) and return its path."""

    def write(data: dict | str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        if isinstance(data, str):
            path.write_text(textwrap.dedent(data), encoding="utf-8")
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


def invoke(*args: Any, **kwargs: Any):
    """Run the ``qlora`` CLI in-process (a fresh registry per call, like the console script)."""
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], obj={}, **kwargs)


def assert_user_error(result: Any, *fragments: str) -> str:
    """Exit code 2, the error on one ``Error:`` line (the last line of stderr), no traceback;
    returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def pip_install_to(source: Path, site: Path) -> Path:
    """``pip install`` the package directory ``source`` into ``site`` (``--target``: no
    dependencies, no index, no build isolation), as a user installs a plugin; returns ``site``."""
    import subprocess

    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "--target", str(site)]
    out = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return site


def install_example(package: Path, root: Path) -> Path:
    """Install the example package ``package`` (a directory under examples/plugins) from a copy
    in ``root`` (pip writes build/ and *.egg-info next to the sources) into ``root/site``."""
    import shutil

    source = root / "src"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return pip_install_to(source, root / "site")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a fake distribution on ``sys.path``: a ``*.dist-info`` with METADATA and an
    ``entry_points.txt`` in group ``qlora_plugins``, plus optional module files. Turns autoload on.
    Modules it created are dropped from ``sys.modules`` afterwards."""
    created: list[str] = []

    def make(name: str, entry_points: dict[str, str], modules: dict[str, str] | None = None, version: str = "1.2.3") -> Path:
        site = tmp_path / f"site-{name}"
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
        lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[qlora_plugins]\n{lines}", encoding="utf-8")
        for module, source in (modules or {}).items():
            (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            created.append(module)
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.delenv("QLORA_PLUGINS_DISABLE_AUTOLOAD", raising=False)
        importlib.invalidate_caches()
        return site

    yield make
    for module in created:
        sys.modules.pop(module, None)


# --- issue 14, generate/eval branch: one trained tiny run shared by test_generate.py,
# test_chat_repl.py and test_evaluators.py ---------------------------------------------------

HELDOUT = DATA / "heldout.txt"
LM_EVAL_TASK = DATA / "lm_eval_task" / "tiny_mc.yaml"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, qlora_home) -> dict:
    """A finished tiny run (tiny-llama, nf4, LoRA r=4, 4 steps at a high learning rate so the
    adapter changes the outputs) with the adapter and merged exports and an ``eval`` section
    (perplexity on tests/data/heldout.txt): ``{"dir", "report", "merged", "adapter"}``."""
    from qlora_plugins.core.config import parse_config
    from qlora_plugins.core.pipeline import run

    root = tmp_path_factory.mktemp("trained-run")
    config = base_config(
        optimizer={"name": "adamw", "lr": 3e-2},
        train={"max_steps": 4, "batch_size": 4, "seed": 0, "threads": 1},
        export=[{"name": "adapter"}, {"name": "merged"}],
        eval=[{"name": "perplexity", "path": str(HELDOUT), "max_examples": 4}],
    )
    out = root / "run"
    report = run(parse_config(config, None), new_registry(), out, progress=False)
    return {"dir": out, "report": report, "merged": out / "exports" / "merged", "adapter": out / "exports" / "adapter"}


# --- end generate/eval ---
