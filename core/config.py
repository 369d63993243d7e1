"""Run configuration: YAML (or TOML) files, ``--set`` overrides, attrs sections, plugin options.

A config has the sections ``model``, ``quantizer``, ``adapter``, ``optimizer``, ``data``, ``train``
and ``export``. ``model`` and ``train`` are fixed attrs classes; every other section names a plugin
(``name: nf4``) and its remaining keys are that plugin's options, validated by the plugin's own
Options class once the registry is known (:func:`resolve_plugins`). Relative paths in a config
file are resolved against the file's directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import attrs
import yaml

from qlora_plugins.core.errors import ConfigError, PluginError
from qlora_plugins.core.interfaces import Plugin
from qlora_plugins.core.options import build_options, did_you_mean, in_range, options_to_dict, positive

SECTIONS = ("model", "quantizer", "adapter", "optimizer", "data", "train", "export")

DEFAULT_PLUGINS = {"quantizer": "nf4", "adapter": "lora", "optimizer": "paged_adamw"}
PLUGIN_KINDS = {"quantizer": "quantizer", "adapter": "adapter", "optimizer": "optimizer", "data": "data_format"}


@attrs.define
class ModelSection:
    """``model``: which checkpoint to fine-tune and how to load it."""

    path: Optional[str] = None
    source: Optional[str] = None
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: store frozen unquantized weights (embeddings, head) in 16 bits, computing in ``dtype``
    frozen_dtype: Optional[Literal["bfloat16", "float16"]] = None
    trust_remote_code: bool = False
    num_labels: Optional[int] = attrs.field(default=None, validator=positive)

    def __attrs_post_init__(self) -> None:
        if (self.path is None) == (self.source is None):
            raise ConfigError("model", "set exactly one of 'path' (a checkpoint directory) or 'source' (a named model)")


@attrs.define
class TrainSection:
    """``train``: the training loop."""

    enabled: bool = True
    max_steps: Optional[int] = attrs.field(default=100, validator=positive)
    epochs: Optional[float] = attrs.field(default=None, validator=positive)
    batch_size: int = attrs.field(default=4, validator=in_range(1, 1_000_000))
    gradient_accumulation_steps: int = attrs.field(default=1, validator=in_range(1, 1_000_000))
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = attrs.field(default=0, validator=in_range(0, None))
    max_grad_norm: Optional[float] = attrs.field(default=1.0, validator=positive)
    eval_every: Optional[int] = attrs.field(default=None, validator=positive)
    eval_max_batches: Optional[int] = attrs.field(default=None, validator=positive)
    log_every: int = attrs.field(default=1, validator=in_range(1, None))
    seed: int = 0
    gradient_checkpointing: bool = True
    checkpoint_every: Optional[int] = attrs.field(default=None, validator=positive)
    keep_checkpoints: int = attrs.field(default=2, validator=in_range(1, None))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = attrs.field(default=None, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("train.max_steps", "set max_steps or epochs")


@attrs.define
class PluginSpec:
    """A plugin section as written: the plugin's name, its raw options and its config path."""

    name: str
    options: dict
    path: str


@attrs.define
class Config:
    """A parsed (not yet plugin-resolved) run configuration."""

    model: ModelSection
    train: TrainSection
    quantizer: PluginSpec
    adapter: PluginSpec
    optimizer: PluginSpec
    data: Optional[PluginSpec]
    export: list[PluginSpec]
    source: Optional[Path] = None
    base_dir: Path = attrs.field(factory=Path.cwd)

    def resolve_path(self, value: str) -> Path:
        """A path from the config, made absolute against the config file's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)


@attrs.define
class ResolvedPlugins:
    """Plugin instances built from a config's sections (options validated)."""

    quantizer: Plugin
    adapter: Plugin
    optimizer: Plugin
    data: Optional[Plugin]
    exporters: list[Plugin]


def read_config_file(path: Path) -> dict:
    """Parse a YAML or TOML file into a mapping; syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "config file not found", source=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("", "is a directory, not a config file", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("", "is not UTF-8 text", source=str(path)) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror}", source=str(path)) from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError("", "TOML configs need Python 3.11 or newer; use YAML", source=str(path)) from None

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"invalid TOML: {exc}", source=str(path)) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError("", f"invalid YAML{where}: {problem}", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"must be a mapping of sections, got {type(data).__name__}", source=str(path))
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", f"expected KEY=VALUE like train.max_steps=10, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _child_container(node, part, parts[i + 1], ".".join(parts[: i + 1]))
        last = parts[-1]
        if isinstance(node, list):
            index = _list_index(node, last, key, allow_append=True)
            if index == len(node):
                node.append(value)
            else:
                node[index] = value
        else:
            node[last] = value
    return data


def _child_container(node: Any, part: str, nxt: str, path: str) -> Any:
    """The mapping or list at ``node[part]`` that an override descends into, created if missing.

    A string there is a plugin shorthand (``quantizer: fp4``, ``export: [adapter]``) and becomes
    ``{name: ...}`` so that overriding one option keeps the plugin; other scalars are replaced.
    """
    if isinstance(node, list):
        key: Any = _list_index(node, part, path, allow_append=True)
        if key == len(node):
            node.append(None)
    else:
        key = part
    child = node[key] if isinstance(node, list) else node.get(key)
    if not isinstance(child, (dict, list)):
        if isinstance(child, str) and not nxt.isdecimal():
            child = {"name": child}
        else:
            child = [] if nxt.isdecimal() else {}
        node[key] = child
    return child


def _list_index(node: list, part: str, path: str, allow_append: bool = False) -> int:
    if not part.isdecimal() or int(part) > len(node) or (int(part) == len(node) and not allow_append):
        raise ConfigError(path, f"list index {part!r} is out of range (the list has {len(node)} items)")
    return int(part)


def _plugin_spec(section: str, value: Any, default: str | None) -> PluginSpec | None:
    if value is None:
        return PluginSpec(default, {}, section) if default else None
    if isinstance(value, str):  # shorthand: `quantizer: nf4`
        return PluginSpec(value, {}, section)
    if not isinstance(value, Mapping):
        raise ConfigError(section, f"must be a mapping with a 'name' key, got {value!r}")
    options = dict(value)
    name = options.pop("name", default)
    if name is None:
        raise ConfigError(f"{section}.name", "is required")
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name", f"must be a string, got {name!r}")
    return PluginSpec(name, options, section)


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Check the sections and build :class:`Config` (plugin options are checked later)."""
    src = str(source) if source else None
    try:
        for key in data:
            if key not in SECTIONS:
                hint = did_you_mean(str(key), SECTIONS)
                raise ConfigError(str(key), f"unknown section{hint}; sections are: {', '.join(SECTIONS)}")
        if "model" not in data:
            raise ConfigError("model", "is required (set model.path or model.source)")
        model = _section(ModelSection, data.get("model"), "model")
        train_raw = data.get("train")
        if isinstance(train_raw, Mapping) and train_raw.get("epochs") is not None and "max_steps" not in train_raw:
            train_raw = {**train_raw, "max_steps": None}  # epochs alone: do not let the max_steps default win
        train = _section(TrainSection, train_raw, "train")
        specs = {s: _plugin_spec(s, data.get(s), DEFAULT_PLUGINS.get(s)) for s in ("quantizer", "adapter", "optimizer", "data")}
        export_raw = data.get("export", [{"name": "adapter"}])
        if export_raw is None:
            export_raw = []
        if isinstance(export_raw, (str, Mapping)):
            export_raw = [export_raw]
        if not isinstance(export_raw, list):
            raise ConfigError("export", f"must be a list of exporters, got {export_raw!r}")
        exports = [_plugin_spec(f"export[{i}]", item, None) for i, item in enumerate(export_raw)]
        for i, spec in enumerate(exports):
            if spec is None:
                raise ConfigError(f"export[{i}]", "must name an exporter (e.g. `- name: adapter`), got null")
        if train.enabled and specs["data"] is None:
            raise ConfigError("data", "is required when train.enabled is true")
    except ConfigError as exc:
        if src and exc.source is None:
            raise ConfigError(exc.path, exc.message, source=src) from None
        raise
    base_dir = source.resolve().parent if source else Path.cwd()
    return Config(model, train, specs["quantizer"], specs["adapter"], specs["optimizer"], specs["data"], exports, source, base_dir)


def _section(cls: type, value: Any, path: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {value!r}")
    return build_options(cls, value, path)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and parse a config file."""
    path = Path(path)
    data = apply_overrides(read_config_file(path), overrides or [])
    return parse_config(data, path)


def resolve_plugins(config: Config, registry: Any) -> ResolvedPlugins:
    """Instantiate every plugin the config names, validating its options."""
    src = str(config.source) if config.source else None

    def make(kind: str, spec: PluginSpec) -> Plugin:
        try:
            return registry.create(kind, spec.name, spec.options, spec.path)
        except ConfigError as exc:
            if src and exc.source is None:
                raise ConfigError(exc.path, exc.message, source=src) from None
            raise
        except PluginError as exc:
            raise PluginError(f"{src}: {exc}" if src else str(exc)) from None

    names = [spec.name for spec in config.export]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"export[{i}].name", f"duplicate exporter '{name}' (each exporter writes exports/{name}/)", source=src)
    return ResolvedPlugins(
        quantizer=make("quantizer", config.quantizer),
        adapter=make("adapter", config.adapter),
        optimizer=make("optimizer", config.optimizer),
        data=make("data_format", config.data) if config.data else None,
        exporters=[make("exporter", spec) for spec in config.export],
    )


def resolved_dict(config: Config, plugins: ResolvedPlugins) -> dict:
    """The config with every default filled in, as written to the run directory."""

    def section(plugin: Plugin | None) -> dict | None:
        return None if plugin is None else {"name": plugin.name, **options_to_dict(plugin.options)}

    out = {
        "model": attrs.asdict(config.model),
        "quantizer": section(plugins.quantizer),
        "adapter": section(plugins.adapter),
        "optimizer": section(plugins.optimizer),
        "data": section(plugins.data),
        "train": attrs.asdict(config.train),
        "export": [section(p) for p in plugins.exporters],
    }
    if config.model.path is not None:
        out["model"]["path"] = str(config.resolve_path(config.model.path))
    if plugins.data is not None and hasattr(plugins.data.options, "path"):
        out["data"]["path"] = str(config.resolve_path(plugins.data.options.path))
    return out
