"""The public API by audience (docs/architecture.md, "Public API"): plugin authors, programmatic
users and test writers find what they need under ``qlora_plugins`` without ``qlora_plugins.core``.
Builtins and the example packages are held to that: they import no ``qlora_plugins.core``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLIC = [
    "qlora_plugins",
    "qlora_plugins.api",
    "qlora_plugins.errors",
    "qlora_plugins.options",
    "qlora_plugins.exporting",
    "qlora_plugins.quantized",
    "qlora_plugins.quant_linear",
    "qlora_plugins.kernels",
    "qlora_plugins.modeling",
    "qlora_plugins.data",
    "qlora_plugins.testing",
    "qlora_plugins.planning",
    "qlora_plugins.tracking",
]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative imports resolved to nothing."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def plugin_code() -> list[Path]:
    files = sorted((REPO / "builtin_plugins").glob("*.py")) + sorted((REPO / "examples").rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def test_the_scan_sees_builtins_and_examples():
    names = {p.name for p in plugin_code()}
    assert {"adapter_lora.py", "exporter_merged_4bit.py", "__init__.py"} <= names
    assert any("qlora-gguf" in str(p) for p in plugin_code())


@pytest.mark.parametrize("path", plugin_code(), ids=lambda p: str(p.relative_to(REPO)))
def test_builtins_and_examples_use_only_the_public_api(path):
    bad = [
        (line, module) for line, module in imports_of(path) if module == "qlora_plugins.core" or module.startswith("qlora_plugins.core.")
    ]
    assert not bad, f"{path.relative_to(REPO)} imports the core: {bad} (add the name to a public module under qlora_plugins/)"


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_module_declares_and_exports_its_names(module):
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert names, f"{module} has no __all__"
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"


def test_the_plugin_guide_recipes_import_no_core():
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    blocks = text.split("```")[1::2]
    offending = [b.splitlines()[0] for b in blocks if "qlora_plugins.core" in b]
    assert not offending, f"docs/plugins.md code blocks import qlora_plugins.core: {offending}"


def test_the_testing_kit_runs_a_plugin_through_the_cli(tmp_path):
    import yaml

    from qlora_plugins import Optimizer, hookimpl
    from qlora_plugins.testing import make_registry, run_cli, tiny_model_dir

    class Sgd(Optimizer):
        name = "kit_sgd"

        def create(self, params, device):
            import torch

            return torch.optim.SGD(params, lr=self.options.lr)

    class Plugin:
        @hookimpl
        def register_optimizers(self, register):
            register(Sgd)

    model = tiny_model_dir("tiny-llama")
    assert (model / "config.json").is_file()
    config = tmp_path / "c.yaml"
    data = REPO / "tests" / "data" / "instructions.jsonl"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model)},
                "optimizer": {"name": "kit_sgd", "lr": 0.01},
                "data": {"name": "instruction", "path": str(data), "max_length": 64},
                "train": {"max_steps": 2, "batch_size": 4},
                "export": [],
            }
        )
    )
    result = run_cli("run", config, "-o", tmp_path / "run", "--no-progress", registry=make_registry([Plugin()]))
    assert result.exit_code == 0, result.output
    assert "kit_sgd" in result.stdout
