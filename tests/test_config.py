"""Config files (YAML, TOML), ``--set`` overrides, section and plugin-option validation with
path-qualified errors, defaults in the resolved config, and a property-based fuzz: whatever the
mapping, only :class:`QloraError` subclasses come out."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import yaml
from conftest import INSTRUCTIONS, base_config, new_registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_plugins.core.config import (
    SECTIONS,
    ModelSection,
    TrainSection,
    apply_overrides,
    load_config,
    parse_config,
    read_config_file,
    resolve_plugins,
    resolved_dict,
)
from qlora_plugins.errors import ConfigError, PluginError, QloraError

REGISTRY = new_registry()


def resolved(data: dict) -> dict:
    config = parse_config(data)
    return resolved_dict(config, resolve_plugins(config, REGISTRY))


def error_of(data: dict) -> str:
    with pytest.raises(QloraError) as exc:
        resolved(data)
    return str(exc.value)


# --- files -----------------------------------------------------------------------------------


def test_yaml_file_loads_and_relative_paths_follow_the_file(tmp_path, write_config):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text(
        "model:\n  path: ../models/m\nquantizer: fp4\ndata:\n  name: text\n  path: corpus.txt\ntrain:\n  max_steps: 7\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.source == path
    assert config.base_dir == path.parent.resolve()
    assert config.quantizer.name == "fp4"
    assert config.train.max_steps == 7
    assert config.resolve_path(config.model.path) == path.parent.resolve() / "../models/m"
    out = resolved_dict(config, resolve_plugins(config, REGISTRY))
    assert out["data"]["path"] == str(path.parent.resolve() / "corpus.txt")
    assert out["model"]["path"] == str(path.parent.resolve() / "../models/m")


def test_toml_file_loads_like_yaml(tmp_path, write_config):
    data = base_config()
    yaml_path = write_config(data, "c.yaml")
    toml_path = tmp_path / "c.toml"
    toml_path.write_text(
        f"""
[model]
source = "tiny-llama"

[quantizer]
name = "nf4"

[adapter]
name = "lora"
r = 4
alpha = 8

[optimizer]
name = "adamw"
lr = 1e-3

[data]
name = "instruction"
path = "{INSTRUCTIONS}"
max_length = 64
eval_fraction = 0.1

[train]
max_steps = 3
batch_size = 4
seed = 0

[[export]]
name = "adapter"
""",
        encoding="utf-8",
    )
    from_yaml, from_toml = load_config(yaml_path), load_config(toml_path)
    assert attrs.evolve(from_toml, source=None) == attrs.evolve(from_yaml, source=None)


def test_yaml_syntax_error_names_file_and_line(write_config):
    path = write_config("model:\n  source: tiny-llama\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        read_config_file(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: invalid YAML at line ")
    line = int(message.split("at line ")[1].split(",")[0])
    assert line in (4, 5)


def test_toml_syntax_error_names_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\nsource = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 1"):
        read_config_file(path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "config file not found"),
        (b"\xff\xfe\x00bad", "is not UTF-8 text"),
        (b"- a\n- b\n", "must be a mapping of sections, got list"),
        (b"just a string\n", "must be a mapping of sections, got str"),
    ],
)
def test_unreadable_config_files(tmp_path, content, fragment):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        read_config_file(path)
    with pytest.raises(ConfigError, match="is a directory"):
        read_config_file(tmp_path)


def test_empty_file_means_missing_model(write_config):
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(""))
    assert str(exc.value).endswith("model: is required (set model.path or model.source)")


def test_errors_from_a_file_name_the_file(write_config):
    path = write_config({"model": {"source": "tiny-llama"}, "train": {"max_steps": "ten"}, "data": {"name": "text", "path": "x.txt"}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: train.max_steps: must be an integer, got 'ten'"
    assert exc.value.path == "train.max_steps" and exc.value.source == str(path)


# --- overrides -------------------------------------------------------------------------------


def test_override_values_are_parsed_as_yaml():
    out = apply_overrides(
        {"train": {"max_steps": 3}},
        [
            "train.max_steps=10",
            "optimizer.lr=1e-4",
            "optimizer.weight_decay=0.5",
            "quantizer.double_quant=false",
            "adapter.target_modules=[q_proj, v_proj]",
            "model.path=null",
            "data.path=some file.jsonl",
            "data.template=",
        ],
    )
    assert out["train"]["max_steps"] == 10
    assert out["optimizer"] == {"lr": "1e-4", "weight_decay": 0.5}  # YAML 1.1: "1e-4" is a string...
    assert out["quantizer"] == {"double_quant": False}
    assert out["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert out["model"] == {"path": None}
    assert out["data"] == {"path": "some file.jsonl", "template": ""}


def test_float_strings_become_numbers_in_options():
    data = apply_overrides(base_config(), ["optimizer.lr=1e-4"])
    assert resolved(data)["optimizer"]["lr"] == pytest.approx(1e-4)  # ...that the options accept


def test_overrides_do_not_modify_their_input():
    data = {"train": {"max_steps": 3}}
    apply_overrides(data, ["train.max_steps=9", "train.seed=1"])
    assert data == {"train": {"max_steps": 3}}


def test_override_list_items_by_index():
    out = apply_overrides({}, ["export.0.name=adapter"])
    assert out == {"export": [{"name": "adapter"}]}
    out = apply_overrides(
        out, ["export.1.name=merged", "export.0.name=other", "adapter.target_modules.0=q_proj", "adapter.target_modules.1=k_proj"]
    )
    assert out["export"] == [{"name": "other"}, {"name": "merged"}]
    assert out["adapter"]["target_modules"] == ["q_proj", "k_proj"]


def test_override_list_index_errors():
    with pytest.raises(ConfigError, match=r"export\.5: list index '5' is out of range \(the list has 1 items\)"):
        apply_overrides({"export": [{"name": "adapter"}]}, ["export.5.name=x"])
    with pytest.raises(ConfigError, match="list index 'name' is out of range"):
        apply_overrides({"export": [{"name": "adapter"}]}, ["export.name=x"])


@pytest.mark.parametrize("item", ["train.max_steps", "=3", "", " =1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match=r"^overrides: expected KEY=VALUE"):
        apply_overrides({}, [item])


def test_override_keeps_a_plugin_shorthand():
    """`quantizer: fp4` plus `--set quantizer.blocksize=128` is fp4 at blocksize 128 (it used to
    drop the shorthand and silently fall back to the default nf4)."""
    data = base_config(quantizer="fp4")
    out = resolved(apply_overrides(data, ["quantizer.blocksize=128"]))
    assert out["quantizer"]["name"] == "fp4" and out["quantizer"]["blocksize"] == 128


def test_override_into_a_shorthand_list_item():
    """`export: [adapter]` plus `--set export.0.x=...` used to crash with a TypeError."""
    data = base_config(export=["adapter"])
    assert apply_overrides(data, ["export.0.name=adapter"])["export"] == [{"name": "adapter"}]
    message = error_of(apply_overrides(data, ["export.0.bogus=1"]))
    assert message.startswith("export[0].bogus: unknown key")


def test_override_replaces_a_scalar_with_a_mapping():
    out = apply_overrides({"train": 5}, ["train.max_steps=2"])
    assert out == {"train": {"max_steps": 2}}


def test_overrides_on_a_loaded_file(write_config):
    path = write_config(base_config())
    config = load_config(path, ["train.max_steps=11", "quantizer.name=fp4", "adapter.r=2"])
    assert config.train.max_steps == 11
    assert config.quantizer.name == "fp4"
    assert config.adapter.options == {"r": 2, "alpha": 8}


# --- sections --------------------------------------------------------------------------------


def test_unknown_section_suggests_the_closest():
    message = error_of({**base_config(), "quantiser": {"name": "nf4"}})
    assert message.startswith("quantiser: unknown section (did you mean 'quantizer'?)")
    assert "sections are: " + ", ".join(SECTIONS) in message


@pytest.mark.parametrize(
    "section, key, suggestion",
    [
        ("train", "max_step", "max_steps"),
        ("model", "paht", "path"),
        ("quantizer", "blocksze", "blocksize"),
        ("adapter", "target_module", "target_modules"),
        ("optimizer", "learning_rat", None),
        ("data", "max_lenght", "max_length"),
    ],
)
def test_unknown_key_names_the_path_and_suggests(section, key, suggestion):
    data = base_config()
    data[section] = {**data[section], key: 1}
    message = error_of(data)
    assert message.startswith(f"{section}.{key}: unknown key")
    if suggestion:
        assert f"(did you mean '{suggestion}'?)" in message
    else:
        assert "valid keys: " in message and "lr" in message


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("train.max_steps", "ten", "train.max_steps: must be an integer, got 'ten'"),
        ("train.batch_size", 2.5, "train.batch_size: must be an integer, got 2.5"),
        ("train.gradient_checkpointing", "yes", "train.gradient_checkpointing: must be true or false, got 'yes'"),
        ("model.task", "causal-lm", "model.task: must be one of 'causal_lm', 'seq_cls', got 'causal-lm' (did you mean 'causal_lm'?)"),
        ("quantizer.blocksize", "big", "quantizer.blocksize: must be an integer, got 'big'"),
        ("quantizer.double_quant", 1, "quantizer.double_quant: must be true or false, got 1"),
        ("adapter.r", [4], "adapter.r: must be an integer, got [4]"),
        ("adapter.target_modules", 7, "adapter.target_modules:"),
        ("optimizer.lr", "fast", "optimizer.lr: must be a number, got 'fast'"),
        ("optimizer.betas", [0.9, "x"], "optimizer.betas[1]: must be a number, got 'x'"),
        ("data.max_length", None, "data.max_length: must be an integer, got None"),
    ],
)
def test_wrong_type_names_the_config_path(path, value, expected):
    data = apply_overrides(base_config(), [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    if value is None:
        data["data"]["max_length"] = None
    message = error_of(data)
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("quantizer.blocksize", 100, "quantizer.blocksize: must be a power of two in [32, 4096], got 100"),
        ("quantizer.blocksize", 8192, "quantizer.blocksize: must be a power of two in [32, 4096], got 8192"),
        ("train.batch_size", 0, "train.batch_size: must be in [1, 1000000], got 0"),
        ("train.max_steps", -1, "train.max_steps: must be > 0, got -1"),
        ("data.eval_fraction", 0.95, "data.eval_fraction: must be in [0.0, 0.9], got 0.95"),
        ("adapter.dropout", 1.5, "adapter.dropout: must be in [0.0, 0.99], got 1.5"),
        ("adapter.r", 0, "adapter.r: must be in [1, 4096], got 0"),
        ("optimizer.lr", 0, "optimizer.lr: must be > 0, got 0.0"),
        ("optimizer.betas", [0.9, 1.0], "optimizer.betas: must be two numbers in [0, 1), got [0.9, 1.0]"),
        ("adapter.target_modules", [], "adapter.target_modules: must name at least one module"),
    ],
)
def test_out_of_range_names_the_config_path(path, value, expected):
    data = apply_overrides(base_config(), [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    assert error_of(data) == expected or error_of(data).startswith(expected)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1" + "0" * 400])
def test_non_finite_numbers_are_rejected(value):
    """NaN compares false with every bound, so it used to pass `lr > 0` and every range check."""
    message = error_of(apply_overrides(base_config(), [f"optimizer.lr={value}"]))
    assert message.startswith("optimizer.lr: must be a finite number")


def test_invalid_instruction_template_is_a_config_error():
    """A template placeholder other than {instruction}/{input_block} used to raise KeyError mid-run."""
    message = error_of(apply_overrides(base_config(), ["data.template='Q: {question}'"]))
    assert message.startswith("data.template: unknown placeholder {question}")
    message = error_of(apply_overrides(base_config(), ["data.input_template='{'"]))
    assert message.startswith("data.input_template: invalid format string")
    ok = resolved(apply_overrides(base_config(), ["data.template='Q: {instruction} {{literal}} {input_block}A: '"]))
    assert ok["data"]["template"] == "Q: {instruction} {{literal}} {input_block}A: "


def test_model_section_rules():
    assert error_of({"data": {"name": "text", "path": "x"}}) == "model: is required (set model.path or model.source)"
    both = "model: set exactly one of 'path' (a checkpoint directory) or 'source' (a named model)"
    assert error_of(base_config(model={"path": "m", "source": "tiny-llama"})) == both
    assert error_of(base_config(model={"task": "causal_lm"})) == both
    assert error_of(base_config(model="tiny-llama")) == "model: must be a mapping, got 'tiny-llama'"
    assert error_of(base_config(model={"source": "tiny-llama", "num_labels": 0})) == "model.num_labels: must be > 0, got 0"


def test_plugin_section_rules():
    assert error_of(base_config(data={"path": "x.jsonl"})) == "data.name: is required"
    assert error_of(base_config(data=None)) == "data: is required when train.enabled is true"
    assert error_of(base_config(quantizer={"name": 4})) == "quantizer.name: must be a string, got 4"
    assert error_of(base_config(quantizer=["nf4"])).startswith("quantizer: must be a mapping with a 'name' key")
    assert error_of(base_config(export={"blocksize": 1})) == "export[0].name: is required"
    assert error_of(base_config(export=[None])).startswith("export[0]: must name an exporter")
    assert error_of(base_config(export=7)) == "export: must be a list of exporters, got 7"
    message = error_of(base_config(optimizer={"name": "adamw8bit"}))
    assert message.startswith("optimizer.name: unknown optimizer 'adamw8bit' (did you mean 'adamw_8bit'?); available: ")
    message = error_of(base_config(data={"name": "instructions", "path": "x"}))
    assert "unknown data format 'instructions' (did you mean 'instruction'?)" in message


def test_train_disabled_needs_no_data():
    out = resolved(base_config(data=None, train={"enabled": False}))
    assert out["data"] is None and out["train"]["enabled"] is False


def test_epochs_alone_are_honoured():
    """`train.epochs: 2` used to be ignored because max_steps defaulted to 100 and wins."""
    out = resolved(base_config(train={"epochs": 2}))
    assert out["train"]["epochs"] == 2.0 and out["train"]["max_steps"] is None
    both = resolved(base_config(train={"epochs": 2, "max_steps": 5}))
    assert both["train"]["max_steps"] == 5
    assert error_of(base_config(train={"max_steps": None})) == "train.max_steps: set max_steps or epochs"


def test_shorthands():
    out = resolved(base_config(quantizer="fp4", adapter="lora", optimizer="adamw_8bit", export="adapter"))
    assert out["quantizer"]["name"] == "fp4" and out["optimizer"]["name"] == "adamw_8bit"
    assert out["export"] == [{"name": "adapter"}]
    assert resolved({**base_config(), "export": None})["export"] == []
    assert resolved(base_config(export=[]))["export"] == []


def test_defaults_are_filled_in_the_resolved_config():
    out = resolved({"model": {"source": "tiny-llama"}, "data": {"name": "instruction", "path": "d.jsonl"}})
    assert list(out) == ["model", "quantizer", "adapter", "optimizer", "data", "train", "export", "track"]
    assert out["track"] == [{"name": "jsonl"}]
    assert out["model"] == {
        "path": None,
        "source": "tiny-llama",
        "revision": None,
        "task": "causal_lm",
        "dtype": "float32",
        "frozen_dtype": None,
        "trust_remote_code": False,
        "num_labels": None,
    }
    assert out["quantizer"]["name"] == "nf4"
    assert out["quantizer"]["blocksize"] == 64 and out["quantizer"]["double_quant"] is True
    assert out["adapter"]["name"] == "lora"
    assert (out["adapter"]["r"], out["adapter"]["alpha"], out["adapter"]["dropout"]) == (16, 32, 0.05)
    assert out["adapter"]["target_modules"] == "all-linear"
    assert out["optimizer"] == {"name": "paged_adamw", "lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
    assert out["data"]["max_length"] == 256 and out["data"]["eval_fraction"] == 0.1
    assert out["data"]["path"] == str(Path.cwd() / "d.jsonl")
    assert out["train"] == attrs.asdict(TrainSection())
    assert out["train"]["max_steps"] == 100 and out["train"]["batch_size"] == 4
    assert out["train"]["gradient_checkpointing"] is True and out["train"]["seed"] == 0
    assert out["export"] == [{"name": "adapter"}]


def test_resolved_config_round_trips():
    """The resolved config parses back into the same resolved config (no source: see the e2e
    test for the run directory's copy)."""
    first = resolved(base_config(quantizer={"name": "fp4", "blocksize": 128}, train={"epochs": 1.5}))
    again = resolved(yaml.safe_load(yaml.safe_dump(first)))
    assert again == first


def test_resolve_plugins_errors_name_the_file(write_config):
    path = write_config(base_config(quantizer={"name": "nf5"}))
    config = load_config(path)
    with pytest.raises(PluginError) as exc:
        resolve_plugins(config, REGISTRY)
    assert str(exc.value).startswith(f"{path}: quantizer.name: unknown quantizer 'nf5'")
    path = write_config(base_config(quantizer={"name": "nf4", "blocksize": 100}), "b.yaml")
    with pytest.raises(ConfigError) as exc:
        resolve_plugins(load_config(path), REGISTRY)
    assert str(exc.value) == f"{path}: quantizer.blocksize: must be a power of two in [32, 4096], got 100"


# --- property-based fuzz ---------------------------------------------------------------------


def _option_names() -> list[str]:
    names = {f.name for cls in (ModelSection, TrainSection) for f in attrs.fields(cls)}
    for reg in REGISTRY.registrations():
        names |= {f.name for f in attrs.fields(reg.cls.Options)}
    return sorted(names | {"name"})


PLUGIN_NAMES = sorted({reg.name for reg in REGISTRY.registrations()})
KEYS = st.one_of(st.sampled_from(_option_names()), st.text(max_size=6))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(PLUGIN_NAMES + ["all-linear", "causal_lm", "seq_cls", "float32", "1e-4", "64", "q_proj"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
SECTION_VALUES = st.one_of(
    VALUES,
    st.fixed_dictionaries({"name": st.sampled_from(PLUGIN_NAMES)}, optional={"": VALUES}).flatmap(
        lambda base: st.dictionaries(KEYS, VALUES, max_size=4).map(lambda extra: {**extra, **base})
    ),
)
CONFIGS = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)), SECTION_VALUES, max_size=8),
    st.fixed_dictionaries(
        {"model": st.one_of(st.just({"source": "tiny-llama"}), VALUES)},
        optional={s: SECTION_VALUES for s in SECTIONS if s != "model"},
    ),
)


def _section_keys(section: str) -> list[str]:
    if section == "model":
        return [f.name for f in attrs.fields(ModelSection)]
    if section == "train":
        return [f.name for f in attrs.fields(TrainSection)]
    kind = {
        "quantizer": "quantizer",
        "adapter": "adapter",
        "optimizer": "optimizer",
        "data": "data_format",
        "export": "exporter",
        "eval": "evaluator",
        "track": "tracker",
    }[section]
    return sorted({f.name for reg in REGISTRY.registrations(kind) for f in attrs.fields(reg.cls.Options)} | {"name"})


def _mutate(base: dict, edits: list) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in base.items()}
    for section, key, value, whole in edits:
        if whole:
            data[section] = value
        elif section == "export":
            existing = data.get("export") if isinstance(data.get("export"), list) else []
            data["export"] = [*existing, value] if key == "name" else [{"name": "adapter", key: value}]
        elif isinstance(data.get(section), dict):
            data[section][key] = value
    return data


EDITS = st.sampled_from(SECTIONS).flatmap(
    lambda section: st.tuples(
        st.just(section),
        st.sampled_from(_section_keys(section)),
        st.one_of(SCALARS, VALUES),
        st.booleans().map(lambda b: b and False) | st.just(False) | st.booleans(),
    )
)
VALID_BASES = st.sampled_from(
    [
        base_config(),
        base_config(quantizer="fp4", export=["adapter"], train={"enabled": False}),
        base_config(model={"source": "tiny-bert", "task": "seq_cls"}, data={"name": "classification", "path": "c.csv"}),
    ]
)
MUTATED = st.builds(_mutate, VALID_BASES, st.lists(EDITS, min_size=1, max_size=3))
CONFIGS = st.one_of(CONFIGS, MUTATED, MUTATED)
FUZZ = settings(
    max_examples=int(os.environ.get("QLORA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _resolve_or_user_error(data: dict) -> dict | None:
    try:
        config = parse_config(data)
        out = resolved_dict(config, resolve_plugins(config, REGISTRY))
    except QloraError as exc:
        assert str(exc)  # a message to print
        return None
    yaml.safe_dump(out)  # what the run directory gets must serialize
    return out


@FUZZ
@given(CONFIGS)
@pytest.mark.slow
def test_fuzz_parse_and_resolve_raise_only_user_errors(data):
    out = _resolve_or_user_error(data)
    if out is not None:  # whatever resolves, re-resolves to itself
        assert _resolve_or_user_error(yaml.safe_load(yaml.safe_dump(out))) == out


OVERRIDE_KEYS = st.lists(
    st.one_of(st.sampled_from(list(SECTIONS) + _option_names()), st.sampled_from(["0", "1", "3"]), st.text(max_size=4)),
    min_size=1,
    max_size=4,
).map(".".join)
OVERRIDE_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["[a, b]", "{x: 1}", "null", "true", "1e-4", "64", "nf4", "[", "{", "'", "!!python/name:os.system", "&a [*a]"]),
)
OVERRIDES = st.lists(st.tuples(OVERRIDE_KEYS, st.sampled_from(["=", "=", ""]), OVERRIDE_VALUES).map("".join), max_size=5)


@FUZZ
@given(st.one_of(CONFIGS, VALID_BASES), OVERRIDES)
@pytest.mark.slow
def test_fuzz_overrides_raise_only_user_errors(data, overrides):
    try:
        out = apply_overrides(data, overrides)
    except QloraError:
        return
    _resolve_or_user_error(out)


OPTION_CLASSES = sorted({reg.cls.Options for reg in REGISTRY.registrations()} | {ModelSection, TrainSection}, key=lambda c: c.__qualname__)


@FUZZ
@given(st.sampled_from(OPTION_CLASSES), st.dictionaries(KEYS, VALUES, max_size=6))
@pytest.mark.slow
def test_fuzz_build_options_raise_only_config_errors(cls, data):
    from qlora_plugins.core.options import build_options

    try:
        options = build_options(cls, data, "section")
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(options, cls)
