"""Adapter ``full``: every floating-point weight of an unquantized model trains; a quantized base
is refused with a clear error before anything is written; the trained weights round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, base_config, invoke, new_registry

from qlora_plugins.core.interfaces import AdapterContext


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.mark.slow
def test_every_float_parameter_is_trainable(tiny_llama_dir):
    model = load(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    model = new_registry().create("adapter", "full", {}).attach(model, AdapterContext("causal_lm", False))
    params = list(model.parameters())
    assert params and all(p.requires_grad for p in params)


def test_refuses_a_quantized_base(tiny_llama_dir):
    from qlora_plugins.errors import ConfigError

    model = load(tiny_llama_dir)
    new_registry().create("quantizer", "nf4", {}).quantize_model(model, ["lm_head"])
    adapter = new_registry().create("adapter", "full", {})
    with pytest.raises(ConfigError, match="quantizer.name: none"):
        adapter.attach(model, AdapterContext("causal_lm", True))
    with pytest.raises(ConfigError, match="unquantized base"):
        adapter.attach(model, AdapterContext("causal_lm", False))  # the layers give it away too


@pytest.mark.slow
def test_cli_refuses_full_on_nf4_without_writing(write_config, tmp_path):
    config = write_config(base_config(adapter={"name": "full"}))
    out = tmp_path / "run"
    assert_user_error(invoke("run", config, "--output", out, "--no-progress"), "adapter.name", "quantizer.name: none")
    assert not out.exists()


@pytest.mark.slow
def test_full_fine_tuning_runs_and_saves_loadable_weights(write_config, tmp_path, tiny_llama_dir):
    config = write_config(
        base_config(quantizer={"name": "none"}, adapter={"name": "full"}, train={"max_steps": 2, "batch_size": 4, "seed": 0})
    )
    out = tmp_path / "run"
    result = invoke("run", config, "--output", out, "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["trainable"] == report["parameters"]["total"]
    saved = out / "adapter" / "model.safetensors"
    assert saved.is_file()

    from safetensors.torch import load_file

    trained = load_file(str(saved))
    base = load(tiny_llama_dir)
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert changed  # training moved weights
    adapter = new_registry().create("adapter", "full", {})
    restored = adapter.load(base, out / "adapter", AdapterContext("causal_lm", False))
    for name, p in restored.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)
