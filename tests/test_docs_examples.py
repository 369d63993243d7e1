"""The complete examples of docs/plugins.md ("Writing a quantizer", "Writing an exporter") run as
written: each code block that follows an ``<!-- example: NAME -->`` marker is executed as a module,
registered like a third-party plugin, put through the quantizer conformance kit and a training run
with an export."""

from __future__ import annotations

import re
import sys
import types

import pytest
from conftest import INSTRUCTIONS, REPO, new_registry

from qlora_plugins.testing import quantizer_checks

PLUGINS_MD = REPO / "docs" / "plugins.md"


def example_source(name: str) -> str:
    text = PLUGINS_MD.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/plugins.md has no code block marked <!-- example: {name} -->"
    return match.group(1)


def example_module(name: str) -> types.ModuleType:
    module_name = f"docs_example_{name}"
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module  # attrs and typing resolve annotations through sys.modules
    exec(compile(example_source(name), f"docs/plugins.md <example: {name}>", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def quantizer_example():
    yield example_module("quantizer")
    sys.modules.pop("docs_example_quantizer", None)


@pytest.fixture(scope="module")
def exporter_example():
    yield example_module("exporter")
    sys.modules.pop("docs_example_exporter", None)


def test_the_examples_use_only_the_public_api():
    for name in ("quantizer", "exporter"):
        assert "qlora_plugins.core" not in example_source(name)


def test_the_examples_register_cleanly(quantizer_example, exporter_example):
    registry = new_registry(plugins=[quantizer_example, exporter_example])
    assert not registry.broken, [b.message() for b in registry.broken]
    assert registry.get("quantizer", "int4_abs7") is quantizer_example.Int4Abs7
    exporter = registry.create("exporter", "trained_tensors", {"dtype": "float16", "tolerance": {"max_kl": 0.01}}, "export[0]")
    assert exporter.options.dtype == "float16" and exporter.options.tolerance.max_kl == 0.01
    assert exporter.default_tolerance() == {"max_kl": 1e-3, "min_top1": 0.95}


SLOW_CHECKS = {"check_quant_linear", "check_lora_train_and_merge"}  # build models: seconds each


@pytest.mark.parametrize(
    "check",
    [pytest.param(c, id=c.__name__, marks=[pytest.mark.slow] if c.__name__ in SLOW_CHECKS else []) for c in quantizer_checks()],
)
def test_the_quantizer_example_passes_the_conformance_kit(quantizer_example, check):
    check(quantizer_example.Int4Abs7, {"blocksize": 64, "double_quant": True})


@pytest.mark.slow
def test_the_examples_train_and_export(quantizer_example, exporter_example, tmp_path, tiny_llama_dir):
    from qlora_plugins.core.config import parse_config
    from qlora_plugins.core.pipeline import run

    registry = new_registry(plugins=[quantizer_example, exporter_example])
    config = parse_config(
        {
            "model": {"path": str(tiny_llama_dir)},
            "quantizer": {"name": "int4_abs7", "blocksize": 64},
            "adapter": {"name": "lora", "r": 4, "alpha": 8},
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "data": {"name": "instruction", "path": str(INSTRUCTIONS), "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 4},
            "export": [{"name": "trained_tensors", "directory": "tensors"}],
        },
        tmp_path / "config.yaml",
    )
    report = run(config, registry, tmp_path / "out", progress=False)
    assert report["quantization"]["format"] == "int4_abs7" and report["quantization"]["quantized_params"] > 0
    export = report["exports"]["trained_tensors"]
    assert export["fidelity"]["status"] == "passed" and export["fidelity"]["kl"] <= 1e-6 and export["dtype"] == "float32"
    assert export["fidelity"]["probe"]["sequences"] > 0  # reload() was used: logits were compared
    assert (tmp_path / "out" / "exports" / "tensors" / "tensors.safetensors").is_file()
