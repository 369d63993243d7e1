"""``qlora bench tradeoffs``: the four methods of the trade-off table, each a fresh ``qlora run``
of the user's config, with measured speed, memory and eval loss; bad input fails before running."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error, base_config, new_registry

from qlora_plugins.builtin_plugins import commands_bench


def bench_cli(*args):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    registry = new_registry()
    registry.add_commands(cli)
    return CliRunner().invoke(cli, ["bench", *[str(a) for a in args]], obj={"registry": registry})


def test_variant_overrides_keep_the_users_plugins():
    q = {"name": "int4_asym", "blocksize": 128}
    a = {"name": "lora", "r": 4}
    full = commands_bench.variant_overrides("full", q, a, 3)
    assert 'quantizer={"name": "none"}' in full and 'adapter={"name": "full"}' in full
    assert "train.max_steps=3" in full and "export=[]" in full
    qlora = commands_bench.variant_overrides("qlora_gc", q, a, 3)
    assert f"quantizer={json.dumps(q)}" in qlora and f"adapter={json.dumps(a)}" in qlora
    assert "train.gradient_checkpointing=true" in qlora
    # an unquantized user config still gets a quantized QLoRA
    assert 'quantizer={"name": "nf4", "double_quant": true}' in commands_bench.variant_overrides("qlora", {"name": "none"}, a, 1)


def test_ratios_and_table():
    rows = [
        {"variant": "full", "method": "full", "peak_memory_bytes": 4e9, "step_time_s": 2.0, "eval_loss": 1.0, "trainable_percent": 100.0},
        {"variant": "lora", "method": "lora", "peak_memory_bytes": 2e9, "step_time_s": 1.0, "eval_loss": 1.1, "trainable_percent": 1.0},
        {"variant": "qlora", "method": "qlora", "error": "boom"},
    ]
    commands_bench.add_ratios(rows)
    assert rows[1]["memory_vs_full"] == 0.5 and rows[1]["speed_vs_full"] == 2.0 and rows[1]["speed_vs_lora"] == 1.0
    assert rows[1]["eval_loss_vs_full"] == pytest.approx(0.1)
    text = commands_bench.format_rows(rows, 5)
    assert "failed: boom" in text and "0.50x" in text


@pytest.mark.slow
def test_tradeoffs_end_to_end(write_config):
    config = write_config(base_config(train={"max_steps": 50, "batch_size": 4, "seed": 0}))
    result = bench_cli("tradeoffs", config, "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    methods = {m["variant"]: m for m in data["methods"]}
    assert list(methods) == list(commands_bench.VARIANTS)
    for m in methods.values():
        assert "error" not in m, m
        assert m["step_time_s"] > 0 and m["peak_memory_bytes"] > 0 and m["eval_loss"] > 0
    assert methods["full"]["trainable_percent"] == 100.0
    assert methods["lora"]["trainable_percent"] < 100.0
    assert methods["qlora"]["bits_per_param"] == pytest.approx(4.127, abs=0.05)
    assert methods["full"]["memory_vs_full"] == 1.0 and "speed_vs_lora" in methods["qlora_gc"]


@pytest.mark.slow
def test_tradeoffs_text_table_for_a_subset(write_config):
    config = write_config(base_config())
    result = bench_cli("tradeoffs", config, "--steps", "1", "--methods", "lora")
    assert result.exit_code == 0, result.output
    assert "LoRA (full-precision base)" in result.stdout and "eval loss" in result.stdout


def test_tradeoffs_bad_input(write_config, tmp_path):
    config = write_config(base_config())
    assert_user_error(bench_cli("tradeoffs", config, "--methods", "lora,qlora4"), "--methods", "qlora4")
    assert_user_error(bench_cli("tradeoffs", tmp_path / "missing.yaml"), "not found")
    bad = write_config(base_config(optimizer={"name": "adamw", "lr": -1}), "bad.yaml")
    assert_user_error(bench_cli("tradeoffs", bad), "optimizer.lr")
