"""The memory planner (``qlora plan``): presets, exact weight bytes against the real quantizer,
activations, budgets and suggestions, the CLI (text and JSON) and its errors."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error, new_registry

from qlora_plugins.builtin_plugins.commands_plan import plan_settings
from qlora_plugins.cli import CLI_FLAGS
from qlora_plugins.core import planner as P

REGISTRY = new_registry()


def S(**settings):
    """Planner settings from ``qlora plan``'s flags (plugins built from the registry by name)."""
    return plan_settings(REGISTRY, **settings)


def plan_cli(*args):
    """``qlora plan ...`` through the CLI with the builtin commands added (as ``main`` does)."""
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    registry = new_registry()
    registry.add_commands(cli)
    return CliRunner().invoke(cli, ["plan", *[str(a) for a in args]], obj={"registry": registry})


# --- architectures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params", [("llama-2-7b", 6.738e9), ("llama-2-13b", 13.016e9), ("llama-2-70b", 68.977e9), ("mistral-7b", 7.242e9)]
)
def test_presets_have_the_public_parameter_counts(name, params):
    arch = P.load_architecture(name)
    assert arch.total_params == pytest.approx(params, rel=1e-3)
    assert len(arch.linears) == 7 and all(lin.count == arch.layers for lin in arch.linears)


def test_unknown_model_is_a_clear_error(tmp_path):
    from qlora_plugins.errors import ModelError

    with pytest.raises(ModelError, match="llama-2-7b"):
        P.load_architecture("llama-2-7")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        P.load_architecture(str(tmp_path))


def test_checkpoint_dir_and_config_json_give_the_same_architecture(tiny_llama_dir):
    from_dir = P.load_architecture(str(tiny_llama_dir))
    from_json = P.load_architecture(str(tiny_llama_dir / "config.json"))
    assert from_dir.total_params == from_json.total_params
    assert from_dir.checkpoint_bytes and from_dir.checkpoint_dtype == "float32"
    assert from_dir.source == "checkpoint" and from_json.source == "config"


# --- exact weights against the real thing ---------------------------------------------------


@pytest.mark.parametrize("quantizer, dq", [("nf4", True), ("nf4", False), ("int4_asym", True), ("int4_asym", False)])
def test_planned_weight_bytes_equal_the_quantizers_footprint(tiny_llama_dir, quantizer, dq):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    q = new_registry().create("quantizer", quantizer, {"double_quant": dq})
    q.quantize_model(model, ["lm_head"])
    footprint = q.footprint(model)
    plan = P.make_plan(P.load_architecture(str(tiny_llama_dir)), S(quantizer=quantizer, double_quant=dq, device="cpu"))
    rows = {r.key: r.host for r in plan.rows}
    assert rows["base_weights"] + rows["quant_constants"] == footprint.quantized_bytes
    assert P.load_architecture(str(tiny_llama_dir)).linear_params == footprint.quantized_params


def test_planned_lora_parameters_equal_peft(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_plugins.core.interfaces import AdapterContext

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = new_registry().create("adapter", "lora", {"r": 8}).attach(model, AdapterContext("causal_lm", False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = P.make_plan(P.load_architecture(str(tiny_llama_dir)), S(lora_r=8, quantizer="none"))
    assert plan.trainable_params == trainable


def test_non_llama_models_are_counted_on_the_meta_device(tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), dtype=torch.float32)
    q = new_registry().create("quantizer", "nf4", {})
    q.quantize_model(model, ["lm_head"])
    arch = P.load_architecture(str(tiny_gpt2_dir))
    assert arch.model_type == "gpt2"
    assert arch.linear_params == q.footprint(model).quantized_params


# --- bits per parameter and the 70B arithmetic ----------------------------------------------


def test_bits_per_param_match_the_recipe():
    rows = {(r["quantizer"], r["double_quant"]): r["bits_per_param"] for r in P.quantizer_table(P.load_architecture("llama-2-70b"), S())}
    assert rows[("nf4", False)] == pytest.approx(4.5, abs=1e-3)
    assert rows[("nf4", True)] == pytest.approx(4.127, abs=2e-3)
    assert rows[("int4_asym", False)] == pytest.approx(5.0, abs=1e-3)
    assert rows[("none", False)] == 32


def test_70b_does_not_fit_24gb_and_the_planner_says_why():
    arch = P.load_architecture("llama-2-70b")
    settings = S(dtype="bfloat16", batch=1, seq=512)
    plan = P.make_plan(arch, settings)
    rows = {r.key: r.device for r in plan.rows}
    assert rows["base_weights"] + rows["quant_constants"] > 35e9  # 68.5B x 4.127 bits
    verdict = P.check_budget(arch, settings, P.parse_size("24GB"), P.parse_size("64GB"))
    assert not verdict["fits"] and not verdict["suggestions"]
    assert "nothing the planner can change fits" in verdict["problems"][-1]
    assert P.check_budget(arch, settings, P.parse_size("80GB"), P.parse_size("128GB"))["fits"]


def test_suggestions_fit_when_applied():
    arch = P.load_architecture("llama-2-7b")
    settings = S(dtype="bfloat16", batch=16, seq=2048, gradient_checkpointing=False, optimizer="adamw")
    budget = (P.parse_size("24GB"), P.parse_size("64GB"))
    verdict = P.check_budget(arch, settings, *budget)
    assert not verdict["fits"] and verdict["suggestions"]
    changes = [s["change"] for s in verdict["suggestions"]]
    assert any("checkpointing" in c for c in changes) or any(c.startswith("batch size") for c in changes)
    import attrs

    for suggestion in verdict["suggestions"]:
        assert P.check_budget(arch, attrs.evolve(settings, **suggestion["settings"]), *budget)["fits"], suggestion


def test_paged_and_offloaded_states_move_to_the_host():
    arch = P.load_architecture("llama-2-7b")
    rows = lambda opt: {r.key: r for r in P.make_plan(arch, S(optimizer=opt)).rows}  # noqa: E731
    assert rows("adamw")["optimizer"].device > 0 and rows("adamw")["optimizer"].host == 0
    assert rows("offload_adamw")["optimizer"].device == 0 and rows("offload_adamw")["optimizer"].host > 0
    assert rows("adamw_8bit")["optimizer"].device < rows("adamw")["optimizer"].device / 3


def test_activations_grow_with_tokens_and_checkpointing_saves():
    arch = P.load_architecture("llama-2-7b")
    one = P.make_plan(arch, S(batch=1, seq=1024)).activations
    two = P.make_plan(arch, S(batch=2, seq=1024)).activations
    assert one["checkpointing_on"]["stored"] < one["checkpointing_off"]["stored"] / 10
    assert two["checkpointing_off"]["stored"] == pytest.approx(2 * one["checkpointing_off"]["stored"])


def test_parse_size():
    assert P.parse_size("24GB") == 24e9
    assert P.parse_size("24GiB") == 24 * 2**30
    assert P.parse_size("512 MB") == 512e6
    assert P.parse_size("1000") == 1000
    with pytest.raises(ValueError):
        P.parse_size("lots")


# --- the CLI --------------------------------------------------------------------------------


def test_plan_cli_text_and_budget():
    result = plan_cli("llama-2-70b", "--dtype", "bfloat16", "--device-memory", "24GB", "--host-memory", "64GB")
    assert result.exit_code == 0, result.output
    out = result.output
    for fragment in (
        "base weights (nf4 + DQ",
        "quantization constants",
        "LoRA adapters",
        "gradients",
        "optimizer states",
        "activations",
        "total (device peak)",
        "total (host peak)",
        "nf4 + DQ",
        "4.127",
        "does NOT fit",
    ):
        assert fragment in out, fragment


def test_plan_cli_json(tiny_llama_dir):
    result = plan_cli(tiny_llama_dir, "--device", "cpu", "--batch", "2", "--seq", "64", "--host-memory", "64GB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"]["source"] == "checkpoint" and data["budget"]["fits"] is True
    assert {r["component"] for r in data["rows"]} >= {
        "base_weights",
        "quant_constants",
        "adapters",
        "adapter_grads",
        "optimizer",
        "activations",
    }
    assert data["totals"]["host_peak_bytes"] > data["totals"]["host_baseline_bytes"]
    assert data["activations"]["checkpointing_on"]["stored"] < data["activations"]["checkpointing_off"]["stored"]
    assert len(data["quantizers"]) == 9


def test_plan_cli_tells_what_would_fit():
    result = plan_cli(
        "llama-2-7b",
        "--dtype",
        "bfloat16",
        "--batch",
        "16",
        "--seq",
        "2048",
        "--no-gradient-checkpointing",
        "--optimizer",
        "adamw",
        "--device-memory",
        "24GB",
        "--json",
    )
    data = json.loads(result.output)
    assert data["budget"]["fits"] is False and data["budget"]["suggestions"]


def test_plan_cli_errors(tmp_path):
    assert_user_error(plan_cli("no-such-model"), "presets: llama-2-7b")
    assert_user_error(plan_cli("llama-2-7b", "--quantizer", "nf5"), "--quantizer", "nf4")
    assert_user_error(plan_cli("llama-2-7b", "--target-modules", "q_proj,qq_proj"), "qq_proj")
    assert_user_error(plan_cli("llama-2-7b", "--adapter", "full"), "--quantizer none")
    bad = plan_cli("llama-2-7b", "--device-memory", "lots")
    assert bad.exit_code == 2 and "not a size" in bad.output


# --- plugins the planner knows only through their declared methods --------------------------


def _hqq4_module():
    """The example third-party quantizer package, imported from its source tree."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "plugins" / "qlora-hqq4"))
    try:
        return importlib.import_module("qlora_hqq4")
    finally:
        sys.path.pop(0)


def test_a_third_party_quantizer_is_planned_through_its_declared_bytes(tiny_llama_dir):
    """``qlora plan --quantizer hqq4``: the planner knows hqq4 only through planned_bytes (which
    it inherits from the public BlockwiseQuantizer); its weight bytes equal its real footprint."""
    import torch
    from transformers import AutoModelForCausalLM

    hqq4 = _hqq4_module()
    registry = new_registry(plugins=[hqq4])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    q = registry.create("quantizer", "hqq4", {"iterations": 1})
    q.quantize_model(model, ["lm_head"])
    arch = P.load_architecture(str(tiny_llama_dir))
    plan = P.make_plan(arch, plan_settings(registry, quantizer="hqq4", device="cpu"))
    rows = {r.key: r.host for r in plan.rows}
    assert rows["base_weights"] + rows["quant_constants"] == q.footprint(model).quantized_bytes
    table = {r["label"]: r for r in P.quantizer_table(arch, plan.settings)}
    assert {"hqq4", "hqq4 + DQ", "nf4 + DQ", "none"} <= set(table)
    assert table["hqq4"]["bits_per_param"] == table["int4_asym"]["bits_per_param"]  # two fp32 constants a block

    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    registry.add_commands(cli)
    result = CliRunner().invoke(
        cli, ["plan", str(tiny_llama_dir), "--quantizer", "hqq4", "--device", "cpu", "--json"], obj={"registry": registry}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["settings"]["quantizer"] == "hqq4"


def test_plugins_that_declare_nothing_are_refused_on_one_line():
    import attrs

    from qlora_plugins import Adapter, Optimizer, Quantizer, hookimpl

    class Opaque(Quantizer):
        """A quantizer that does not tell the planner how it stores weights."""

        name = "opaque"

    class Mystery(Adapter):
        """An adapter without planned_* methods."""

        name = "mystery"

    class Silent(Optimizer):
        """An optimizer without planned_state_bytes."""

        name = "silent"

    class Plugin:
        @hookimpl
        def register_quantizers(self, register):
            register(Opaque)

        @hookimpl
        def register_adapters(self, register):
            register(Mystery)

        @hookimpl
        def register_optimizers(self, register):
            register(Silent)

    registry = new_registry(plugins=[Plugin()])
    for kwargs, option, name in (
        ({"quantizer": "opaque"}, "quantizer", "opaque"),
        ({"adapter": "mystery"}, "adapter", "mystery"),
        ({"optimizer": "silent"}, "optimizer", "silent"),
    ):
        with pytest.raises(P.ConfigError) as info:
            plan_settings(registry, **kwargs)
        assert info.value.path == option and f"'{name}' does not declare planned_" in info.value.message
        assert info.value.render(CLI_FLAGS).startswith(f"--{option}: ")  # the CLI spells the option as its flag
    # an undeclared plugin is neither in the table nor suggested
    settings = plan_settings(registry)
    assert "opaque" not in {r["quantizer"] for r in P.quantizer_table(P.load_architecture("llama-2-7b"), settings)}
    verdict = P.check_budget(
        P.load_architecture("llama-2-7b"),
        attrs.evolve(settings, optimizer=registry.create("optimizer", "adamw")),
        P.parse_size("5GB"),
        None,
    )
    assert all(s["settings"].get("optimizer") is None or s["settings"]["optimizer"].name != "silent" for s in verdict["suggestions"])


def test_plan_uses_the_registry_defaults():
    """No name in the planner: omitted plugins are the registry's defaults (nf4, lora, paged_adamw)."""
    settings = P.Settings.from_names(REGISTRY)
    assert (
        (settings.quantizer.name, settings.adapter.name, settings.optimizer.name)
        == (REGISTRY.default("quantizer"), REGISTRY.default("adapter"), REGISTRY.default("optimizer"))
        == ("nf4", "lora", "paged_adamw")
    )
    assert P.make_plan(P.load_architecture("llama-2-7b"), settings).totals == P.make_plan(P.load_architecture("llama-2-7b"), S()).totals


def test_flags_a_plugin_does_not_have_are_refused_when_given():
    assert_user_error(plan_cli("llama-2-7b", "--quantizer", "none", "--blocksize", "128"), "--blocksize: quantizer 'none' has no option")
    assert_user_error(plan_cli("llama-2-7b", "--adapter", "full", "--quantizer", "none", "--lora-r", "8"), "--lora-r: adapter 'full'")
    assert plan_cli("llama-2-7b", "--adapter", "full", "--quantizer", "none").exit_code == 0
