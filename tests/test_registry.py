"""The plugin registry: builtins, tables per kind, provenance, name clashes, broken and blocked
plugins, entry points (real ``*.dist-info`` directories on sys.path) and no global state."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import attrs
import click
import pytest
from conftest import invoke, new_registry

import qlora_plugins
from qlora_plugins import Adapter, DataFormat, Exporter, ModelSource, Optimizer, Quantizer, hookimpl
from qlora_plugins.core import registry as registry_module
from qlora_plugins.core.interfaces import KINDS
from qlora_plugins.errors import ConfigError, PluginError

BUILTINS = {
    "quantizer": {"nf4", "fp4", "none"},
    "adapter": {"lora"},
    "optimizer": {"adamw", "paged_adamw", "adamw_8bit"},
    "exporter": {"adapter"},
    "data_format": {"instruction", "text", "classification"},
    "model_source": {"tiny-llama", "tiny-gpt2", "tiny-bert"},
}


# --- test plugins ----------------------------------------------------------------------------


class ShinyQuantizer(Quantizer):
    """A quantizer that keeps full precision (for registry tests)."""

    name = "shiny"

    def quantize_model(self, model, skip_modules):
        return None


class ShinyAdapter(Adapter):
    """An adapter that does nothing."""

    name = "shiny-adapter"


class ShinyOptimizer(Optimizer):
    """Plain SGD."""

    name = "shiny_sgd"

    def create(self, params, device):
        import torch

        return torch.optim.SGD(params, lr=self.options.lr)


class ShinyExporter(Exporter):
    """Writes nothing."""

    name = "shiny-export"


class ShinyData(DataFormat):
    """No data."""

    name = "shiny-data"


class ShinySource(ModelSource):
    """No model."""

    name = "shiny-model"


class AllKindsPlugin:
    """One plugin providing a class of every kind."""

    @hookimpl
    def register_quantizers(register):
        register(ShinyQuantizer)

    @hookimpl
    def register_adapters(register):
        register(ShinyAdapter)

    @hookimpl
    def register_optimizers(register):
        register(ShinyOptimizer)

    @hookimpl
    def register_exporters(register):
        register(ShinyExporter)

    @hookimpl
    def register_data_formats(register):
        register(ShinyData)

    @hookimpl
    def register_model_sources(register):
        register(ShinySource)


def test_builtins_fill_one_table_per_kind(registry):
    assert set(registry.tables) == set(KINDS)
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind)), kind
        for name in names:
            assert issubclass(registry.get(kind, name), KINDS[kind])
    assert registry.broken == []
    assert registry.blocked == []


def test_builtins_record_distribution_and_version(registry):
    reg = registry.registration("quantizer", "nf4")
    assert reg.source.distribution == "qlora-plugins"
    assert reg.source.version == importlib.metadata.version("qlora-plugins") == qlora_plugins.__version__
    assert reg.source.builtin is True
    row = reg.as_dict()
    assert row["kind"] == "quantizer" and row["name"] == "nf4"
    assert row["distribution"] == "qlora-plugins" and row["builtin"] is True
    assert row["description"]  # one line for `qlora plugins`
    assert "\n" not in row["description"]


def test_every_builtin_has_a_one_line_description(registry):
    for reg in registry.registrations():
        assert reg.cls.summary() and "\n" not in reg.cls.summary(), reg.name


def test_plugin_of_every_kind_registers(registry):
    reg = new_registry(plugins=[AllKindsPlugin])
    assert reg.get("quantizer", "shiny") is ShinyQuantizer
    assert reg.get("adapter", "shiny-adapter") is ShinyAdapter
    assert reg.get("optimizer", "shiny_sgd") is ShinyOptimizer
    assert reg.get("exporter", "shiny-export") is ShinyExporter
    assert reg.get("data_format", "shiny-data") is ShinyData
    assert reg.get("model_source", "shiny-model") is ShinySource
    source = reg.registration("optimizer", "shiny_sgd").source
    assert source.name == "AllKindsPlugin" and source.builtin is False
    assert reg.broken == []
    # builtins are still all there
    assert BUILTINS["quantizer"] <= set(reg.names("quantizer"))


def test_registry_is_fresh_per_call():
    with_plugin = new_registry(plugins=[AllKindsPlugin])
    without = new_registry()
    assert "shiny" in with_plugin.names("quantizer")
    assert "shiny" not in without.names("quantizer")
    assert with_plugin.pm is not without.pm
    assert with_plugin.tables["quantizer"] is not without.tables["quantizer"]


def test_importing_the_registry_has_no_side_effects():
    """No module-level plugin manager; the module can be reloaded (llm's lesson). In a subprocess,
    so that the reload cannot leak new class objects into this test session."""
    assert not any(type(v).__name__ == "PluginManager" for v in vars(registry_module).values())
    code = (
        "import importlib, qlora_plugins.core.registry as r\n"
        "a = r.create_registry(load_entrypoints=False)\n"
        "r = importlib.reload(r)\n"
        "b = r.create_registry(load_entrypoints=False)\n"
        "assert a.pm is not b.pm and a.names('adapter') == b.names('adapter') == ['full', 'lora']\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_create_instantiates_with_validated_options(registry):
    plugin = registry.create("quantizer", "nf4", {"blocksize": 128}, "quantizer")
    assert plugin.options.blocksize == 128
    with pytest.raises(ConfigError) as exc:
        registry.create("quantizer", "nf4", {"blocksize": 100}, "quantizer")
    assert str(exc.value) == "quantizer.blocksize: must be a power of two in [32, 4096], got 100"


def test_unknown_name_lists_available_and_suggests(registry):
    with pytest.raises(PluginError) as exc:
        registry.get("quantizer", "nf5", "quantizer.name")
    message = str(exc.value)
    assert message.startswith("quantizer.name: unknown quantizer 'nf5'")
    assert "did you mean 'nf4'?" in message
    assert message.endswith("; available: " + ", ".join(registry.names("quantizer")))
    assert {"fp4", "nf4", "none"} <= set(registry.names("quantizer"))
    with pytest.raises(PluginError, match="unknown plugin kind 'quantiser'.*did you mean 'quantizer'"):
        registry.get("quantiser", "nf4")


# --- name clashes ----------------------------------------------------------------------------


class ImpostorNF4(Quantizer):
    """Claims the builtin's name without saying so."""

    name = "nf4"


class ReplacementNF4(Quantizer):
    """Takes the builtin nf4 name over on purpose."""

    name = "nf4"
    replaces = True


class ImpostorPlugin:
    @hookimpl
    def register_quantizers(register):
        register(ImpostorNF4)


class ReplacingPlugin:
    @hookimpl
    def register_quantizers(register):
        register(ReplacementNF4)


def test_name_clash_without_replaces_is_rejected():
    reg = new_registry(plugins=[ImpostorPlugin])
    builtin = reg.get("quantizer", "nf4")
    assert builtin is not ImpostorNF4
    assert reg.registration("quantizer", "nf4").source.builtin
    conflicts = [b for b in reg.broken if b.stage == "conflict"]
    assert len(conflicts) == 1
    broken = conflicts[0]
    assert (broken.kind, broken.name, broken.source.name) == ("quantizer", "nf4", "ImpostorPlugin")
    assert "qlora-plugins" in broken.error and "replaces = True" in broken.error


def test_name_clash_with_replaces_wins_and_records_the_replaced():
    builtin = new_registry().get("quantizer", "nf4")
    reg = new_registry(plugins=[ReplacingPlugin])
    registration = reg.registration("quantizer", "nf4")
    assert registration.cls is ReplacementNF4
    assert [r.cls for r in registration.replaced] == [builtin]
    assert registration.as_dict()["replaces"] == ["qlora-plugins:nf4"]
    assert reg.broken == []


# --- defaults ----------------------------------------------------------------------------------


class GreedyDefault(Quantizer):
    """Claims the default quantizer without saying it takes it over."""

    name = "greedy"
    default = True


class NewDefault(Adapter):
    """Takes the default adapter over on purpose."""

    name = "new_default"
    default = True
    replaces = True


class DefaultsPlugin:
    @hookimpl
    def register_quantizers(register):
        register(GreedyDefault)

    @hookimpl
    def register_adapters(register):
        register(NewDefault)


def test_defaults_come_from_the_builtins_default_attribute(registry):
    declared = {kind: [r.name for r in registry.in_order(kind) if r.cls.default] for kind in KINDS}
    assert declared == {
        "quantizer": ["nf4"],
        "adapter": ["lora"],
        "optimizer": ["paged_adamw"],
        "exporter": ["adapter"],
        "data_format": [],
        "model_source": [],
        "evaluator": [],  # issue 14: no default evaluator (an omitted eval section runs none)
        "tracker": ["jsonl"],  # trackers (issue 14)
    }
    assert {kind: registry.default(kind) for kind in KINDS} == {
        "quantizer": "nf4",
        "adapter": "lora",
        "optimizer": "paged_adamw",
        "exporter": "adapter",
        "data_format": None,
        "model_source": None,
        "evaluator": None,
        "tracker": "jsonl",  # trackers (issue 14)
    }
    assert registry.create("quantizer", None).name == "nf4"
    with pytest.raises(PluginError, match="no data format plugin declares itself the default"):
        registry.create("data_format", None, {}, "data")


def test_a_default_is_taken_over_only_with_replaces():
    reg = new_registry(plugins=[DefaultsPlugin])
    assert reg.default("quantizer") == "nf4" and reg.get("quantizer", "greedy") is GreedyDefault  # still registered
    conflicts = [b for b in reg.broken if b.stage == "conflict"]
    assert [(b.kind, b.name) for b in conflicts] == [("quantizer", "greedy")]
    assert "default quantizer" in conflicts[0].error and "replaces = True" in conflicts[0].error
    assert reg.default("adapter") == "new_default"
    # a config without an adapter section now gets the new default; nothing else changed
    from qlora_plugins.core.config import parse_config, resolve_plugins

    config = parse_config({"model": {"source": "tiny-llama"}, "train": {"enabled": False}})
    plugins = resolve_plugins(config, reg)
    assert (plugins.quantizer.name, plugins.adapter.name, plugins.optimizer.name) == ("nf4", "new_default", "paged_adamw")
    assert [e.name for e in plugins.exporters] == ["adapter"]


def test_a_subclass_of_a_default_is_not_a_default():
    lora = new_registry().get("adapter", "lora")
    narrow = type("NarrowLora", (lora,), {"name": "narrow_lora", "__doc__": "LoRA on fewer layers."})

    class Subclassing:
        @hookimpl
        def register_adapters(self, register):
            register(narrow)

    reg = new_registry(plugins=[Subclassing()])
    assert reg.default("adapter") == "lora" and reg.broken == []


def test_blocking_the_default_leaves_no_default():
    reg = new_registry(blocked=["qlora_plugins.builtin_plugins.adapter_lora"])
    assert reg.default("adapter") is None
    from qlora_plugins.core.config import parse_config, resolve_plugins

    with pytest.raises(PluginError, match="adapter.name: no adapter plugin declares itself the default"):
        resolve_plugins(parse_config({"model": {"source": "tiny-llama"}, "train": {"enabled": False}}), reg)


def test_same_class_registered_twice_is_deduplicated():
    class Twice:
        __name__ = "twice"

        @hookimpl
        def register_optimizers(register):
            register(ShinyOptimizer)
            register(ShinyOptimizer)

    reg = new_registry(plugins=[Twice])
    assert reg.get("optimizer", "shiny_sgd") is ShinyOptimizer
    assert reg.broken == []


# --- broken plugins --------------------------------------------------------------------------


class RaisingPlugin:
    @hookimpl
    def register_exporters(register):
        raise RuntimeError("boom in the hook")


def test_plugin_whose_hook_raises_is_broken_and_others_load():
    reg = new_registry(plugins=[RaisingPlugin, AllKindsPlugin])
    broken = [b for b in reg.broken if b.source.name == "RaisingPlugin"]
    assert len(broken) == 1
    assert broken[0].stage == "hook"
    assert "register_exporters raised RuntimeError: boom in the hook" in broken[0].error
    assert "shiny-export" in reg.names("exporter") and "adapter" in reg.names("exporter")


class MisspeltPlugin:
    @hookimpl
    def register_quantizer(register):  # the hook is register_quantizers
        register(ShinyQuantizer)


def test_misspelt_hook_is_broken_with_did_you_mean():
    reg = new_registry(plugins=[MisspeltPlugin])
    assert "shiny" not in reg.names("quantizer")
    (broken,) = reg.broken
    assert broken.stage == "invalid"
    assert "unknown hook 'register_quantizer'" in broken.error
    assert "did you mean 'register_quantizers'?" in broken.error


class NotAQuantizer(Adapter):
    """An adapter registered through the quantizer hook."""

    name = "wrong-kind"


class BadName(Quantizer):
    """A name with spaces and capitals."""

    name = "My Quantizer"


class PlainOptions:
    blocksize = 64


class NotAttrsOptions(Quantizer):
    """Options that are not an attrs class."""

    name = "not-attrs"
    Options = PlainOptions


class InvalidClassesPlugin:
    @hookimpl
    def register_quantizers(register):
        register(NotAQuantizer)
        register(BadName)
        register(NotAttrsOptions)
        register(object())
        register(ShinyQuantizer)


def test_invalid_classes_are_rejected_and_valid_ones_kept():
    reg = new_registry(plugins=[InvalidClassesPlugin])
    errors = [b.error for b in reg.broken]
    assert all(b.stage == "invalid" and b.source.name == "InvalidClassesPlugin" for b in reg.broken)
    assert len(errors) == 4
    assert "NotAQuantizer, which is not a subclass of Quantizer" in errors[0]
    assert "BadName.name must be a lowercase name" in errors[1] and "'My Quantizer'" in errors[1]
    assert "NotAttrsOptions.Options must be an attrs class" in errors[2]
    assert "not a subclass of Quantizer" in errors[3]
    assert "shiny" in reg.names("quantizer")
    assert "wrong-kind" not in reg.names("adapter") and "not-attrs" not in reg.names("quantizer")


def test_broken_plugin_name_is_reported_when_used():
    class BrokenByName:
        __name__ = "broken_by_name"

        @hookimpl
        def register_quantizers(register):
            register(ImpostorNF4)  # conflicts
            register(BadName)

    reg = new_registry(plugins=[BrokenByName])
    with pytest.raises(PluginError) as exc:
        reg.get("quantizer", "My Quantizer", "quantizer.name")
    message = str(exc.value)
    assert message.startswith("quantizer.name: quantizer 'My Quantizer' is broken: ")
    assert "BrokenByName" in message and "must be a lowercase name" in message


# --- blocking and autoload -------------------------------------------------------------------


def test_block_builtin_module_by_name():
    name = "qlora_plugins.builtin_plugins.optimizers"
    reg = new_registry(blocked=[name])
    assert reg.names("optimizer") == ["offload_adamw"]  # the one builtin optimizer in another module
    assert reg.blocked == [name]
    assert "lora" in reg.names("adapter")


def test_block_test_plugin_by_name():
    reg = new_registry(plugins=[AllKindsPlugin], blocked=["AllKindsPlugin"])
    assert "shiny" not in reg.names("quantizer")
    assert "AllKindsPlugin" in reg.blocked


def test_block_from_environment(monkeypatch):
    monkeypatch.setenv("QLORA_PLUGINS_BLOCK", " qlora_plugins.builtin_plugins.data_formats , AllKindsPlugin")
    reg = new_registry(plugins=[AllKindsPlugin])
    assert not {"instruction", "text", "classification"} & set(reg.names("data_format"))  # `chat` is another module
    assert set(reg.blocked) == {"qlora_plugins.builtin_plugins.data_formats", "AllKindsPlugin"}


def test_cli_block_option_and_blocked_listing():
    result = invoke("--block", "qlora_plugins.builtin_plugins.optimizers", "plugins", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["plugins"] if p["kind"] == "optimizer"] == ["offload_adamw"]  # another module
    assert data["blocked"] == ["qlora_plugins.builtin_plugins.optimizers"]
    table = invoke("--block", "qlora_plugins.builtin_plugins.optimizers", "plugins")
    assert "BLOCKED qlora_plugins.builtin_plugins.optimizers" in table.stdout


GOOD_MODULE = """
    import attrs
    import torch
    from qlora_plugins import Optimizer, OptimizerOptions, hookimpl

    class Sgd(Optimizer):
        '''SGD from a fake distribution.'''
        name = "fake_sgd"

        def create(self, params, device):
            return torch.optim.SGD(params, lr=self.options.lr)

    @hookimpl
    def register_optimizers(register):
        register(Sgd)
"""


def test_entry_point_plugin_loads_with_its_distribution(fake_distribution):
    fake_distribution("qlora-fake-sgd", {"fake_sgd_ep": "qlora_fake_sgd_mod"}, {"qlora_fake_sgd_mod": GOOD_MODULE}, version="2.5.0")
    from qlora_plugins.core.registry import create_registry

    reg = create_registry()
    registration = reg.registration("optimizer", "fake_sgd")
    assert registration.source.distribution == "qlora-fake-sgd"
    assert registration.source.version == "2.5.0"
    assert registration.source.entry_point == "fake_sgd_ep = qlora_fake_sgd_mod"
    assert registration.source.builtin is False
    assert reg.broken == []


def test_disable_autoload_env_skips_entry_points(fake_distribution, monkeypatch):
    fake_distribution(
        "qlora-fake-sgd2", {"fake_sgd2_ep": "qlora_fake_sgd2_mod"}, {"qlora_fake_sgd2_mod": GOOD_MODULE.replace("fake_sgd", "fake_sgd2")}
    )
    from qlora_plugins.core.registry import create_registry

    assert "fake_sgd2" in create_registry().names("optimizer")
    monkeypatch.setenv("QLORA_PLUGINS_DISABLE_AUTOLOAD", "1")
    assert "fake_sgd2" not in create_registry().names("optimizer")
    assert "fake_sgd2" not in create_registry(load_entrypoints=None).names("optimizer")
    assert "fake_sgd2" in create_registry(load_entrypoints=True).names("optimizer")
    # and the CLI flag does the same
    monkeypatch.delenv("QLORA_PLUGINS_DISABLE_AUTOLOAD")
    rows = json.loads(invoke("--no-autoload", "plugins", "--json").stdout)["plugins"]
    assert "fake_sgd2" not in {r["name"] for r in rows}
    rows = json.loads(invoke("plugins", "--json").stdout)["plugins"]
    assert "fake_sgd2" in {r["name"] for r in rows}


def test_broken_entry_point_is_listed_and_others_still_load(fake_distribution):
    fake_distribution("qlora-broken-thing", {"broken_thing": "qlora_no_such_module_xyz:plugin"})
    fake_distribution(
        "qlora-fake-sgd3", {"fake_sgd3_ep": "qlora_fake_sgd3_mod"}, {"qlora_fake_sgd3_mod": GOOD_MODULE.replace("fake_sgd", "fake_sgd3")}
    )
    from qlora_plugins.core.registry import create_registry

    reg = create_registry()
    (broken,) = reg.broken
    assert broken.stage == "import"
    assert broken.source.distribution == "qlora-broken-thing"
    assert broken.source.entry_point == "broken_thing = qlora_no_such_module_xyz:plugin"
    assert "ModuleNotFoundError" in broken.error
    assert "fake_sgd3" in reg.names("optimizer")

    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    broken_lines = [line for line in lines if line.startswith("BROKEN")]
    assert len(broken_lines) == 1
    assert "qlora-broken-thing" in broken_lines[0] and "broken_thing" in broken_lines[0]
    assert "ModuleNotFoundError" in broken_lines[0]
    names = {line.split()[1] for line in lines[1:] if not line.startswith(("BROKEN", "BLOCKED"))}
    assert {"nf4", "lora", "adamw", "fake_sgd3"} <= names

    data = json.loads(invoke("plugins", "--json").stdout)
    (row,) = data["broken"]
    assert row["distribution"] == "qlora-broken-thing" and row["stage"] == "import"


def test_entry_point_whose_module_raises_on_import(fake_distribution):
    fake_distribution("qlora-explodes", {"explodes": "qlora_explodes_mod"}, {"qlora_explodes_mod": "raise ImportError('needs libfoo')\n"})
    from qlora_plugins.core.registry import create_registry

    reg = create_registry()
    (broken,) = reg.broken
    assert broken.stage == "import" and "needs libfoo" in broken.error
    assert "qlora-explodes" in broken.message()
    assert BUILTINS["quantizer"] <= set(reg.names("quantizer"))


def test_blocking_an_entry_point_by_name(fake_distribution, monkeypatch):
    fake_distribution("qlora-broken-two", {"broken_two": "qlora_no_such_module_two"})
    from qlora_plugins.core.registry import create_registry

    assert create_registry().broken
    reg = create_registry(blocked=["broken_two"])
    assert reg.broken == [] and reg.blocked == ["broken_two"]
    monkeypatch.setenv("QLORA_PLUGINS_BLOCK", "broken_two")
    assert create_registry().broken == []


# --- register_commands -----------------------------------------------------------------------


class CommandsPlugin:
    @hookimpl
    def register_commands(cli):
        @cli.command()
        @click.argument("who")
        def hello(who):
            """Say hello."""
            click.echo(f"hello {who}")


class RaisingCommandsPlugin:
    @hookimpl
    def register_commands(cli):
        raise ValueError("cannot add commands")


def test_register_commands_adds_subcommands_and_contains_faults():
    from click.testing import CliRunner

    group = click.Group("qlora")
    reg = new_registry(plugins=[CommandsPlugin, RaisingCommandsPlugin])
    reg.add_commands(group)
    assert "hello" in group.commands
    result = CliRunner().invoke(group, ["hello", "world"])
    assert result.exit_code == 0 and result.output == "hello world\n"
    (broken,) = reg.broken
    assert broken.stage == "hook" and "cannot add commands" in broken.error


COMMAND_MODULE = """
    import click
    from qlora_plugins import hookimpl

    @hookimpl
    def register_commands(cli):
        @cli.command("fake-greet")
        def greet():
            '''Greet from a plugin.'''
            click.echo("greetings from a plugin")
"""


def test_entry_point_command_reaches_the_console_script(fake_distribution, capsys):
    from qlora_plugins.cli import cli, main

    fake_distribution("qlora-greeter", {"greeter": "qlora_greeter_mod"}, {"qlora_greeter_mod": COMMAND_MODULE})
    try:
        with pytest.raises(SystemExit) as exc:
            main(["fake-greet"])
        assert exc.value.code == 0
        assert "greetings from a plugin" in capsys.readouterr().out
    finally:
        cli.commands.pop("fake-greet", None)  # main() adds to the global group: undo it
    assert "fake-greet" not in cli.commands


def test_plugin_options_class_is_used_for_validation():
    @attrs.define
    class ShinyOptions:
        level: int = attrs.field(default=1, validator=attrs.validators.in_(range(1, 4)))

    class Leveled(Quantizer):
        """Has options."""

        name = "leveled"
        Options = ShinyOptions

    class LeveledPlugin:
        __name__ = "leveled"

        @hookimpl
        def register_quantizers(register):
            register(Leveled)

    reg = new_registry(plugins=[LeveledPlugin])
    assert reg.create("quantizer", "leveled", {"level": 3}).options.level == 3
    with pytest.raises(ConfigError, match=r"^quantizer\.level"):
        reg.create("quantizer", "leveled", {"level": 7}, "quantizer")
    with pytest.raises(ConfigError, match=r"quantizer\.levle: unknown key \(did you mean 'level'\?\)"):
        reg.create("quantizer", "leveled", {"levle": 2}, "quantizer")
