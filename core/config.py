"""Run configuration: YAML (or TOML) files, ``--set`` overrides, attrs sections, plugin options.

A config has the sections ``model``, ``quantizer``, ``adapter``, ``optimizer``, ``data``, ``train``
and ``export``. ``model`` and ``train`` are fixed attrs classes; every other section names a plugin
(``name: nf4``) and its remaining keys are that plugin's options, validated by the plugin's own
Options class once the registry is known (:func:`resolve_plugins`). A ``quantizer``, ``adapter``
or ``optimizer`` section that is omitted (or gives no ``name``), and an omitted ``export``
section, get the registry's default plugin of the kind (a plugin class that sets
``default = True``; see :meth:`~qlora_plugins.core.registry.Registry.default`): this module names
no plugin. Relative paths in a config file are resolved against the file's directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import attrs
import yaml

from qlora_plugins.core.errors import ConfigError, PluginError, short_repr
from qlora_plugins.core.hub import is_hub_id
from qlora_plugins.core.interfaces import Plugin
from qlora_plugins.core.mixing import DataHostOptions, MixedSources, split_host_options
from qlora_plugins.core.options import build_options, did_you_mean, in_range, key_text, options_to_dict, positive
from qlora_plugins.core.wording import option

SECTIONS = (
    "model",
    "quantizer",
    "adapter",
    "optimizer",
    "data",
    "train",
    "export",
    "eval",  # issue 14: evaluators run after training
    "track",  # issue 14: metrics trackers
)

#: Sections that take the registry's default plugin of their kind when omitted (``data`` names
#: its files, so it has no default; ``export`` defaults to a list of the default exporter).
DEFAULTED_SECTIONS = ("quantizer", "adapter", "optimizer")
PLUGIN_KINDS = {"quantizer": "quantizer", "adapter": "adapter", "optimizer": "optimizer", "data": "data_format"}


@attrs.define
class ModelSection:
    """``model``: which checkpoint to fine-tune and how to load it."""

    #: a local checkpoint directory, or a Hugging Face Hub id ``org/name`` (core/hub.py: a path
    #: that exists locally is local)
    path: Optional[str] = None
    source: Optional[str] = None
    #: the Hub revision (branch, tag or commit) of a Hub id; None: the default branch
    revision: Optional[str] = None
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
    seed: int = attrs.field(default=0, validator=in_range(0, 2**32 - 1))  # what numpy, torch and random all accept
    gradient_checkpointing: bool = True
    checkpoint_every: Optional[int] = attrs.field(default=None, validator=positive)
    keep_checkpoints: int = attrs.field(default=2, validator=in_range(1, None))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = attrs.field(default=None, validator=positive)
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"

    def __attrs_post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("train.max_steps", "set max_steps or epochs")


@attrs.define
class PluginSpec:
    """A plugin section as written: the plugin's name (None: the registry's default of the
    kind, chosen by :func:`resolve_plugins`), its raw options and its config path."""

    name: Optional[str]
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
    #: ``eval``: evaluators run after training on the base and the fine-tuned model (issue 14)
    eval: list[PluginSpec] = attrs.field(factory=list)
    #: ``track``: the metrics trackers as written (the kind's default one always runs too)
    track: list[PluginSpec] = attrs.field(factory=list)
    #: the ``data`` section's host keys (``packing``, ``sources``), taken out of ``data.options``
    data_host: DataHostOptions = attrs.field(factory=DataHostOptions)

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
    evaluators: list[Plugin] = attrs.field(factory=list)  # issue 14: the ``eval`` section
    trackers: list[Plugin] = attrs.field(factory=list)


#: Config files larger than this are refused before they are parsed.
MAX_CONFIG_BYTES = 1 << 20

#: Limits of a YAML config (:func:`load_yaml`; TOML gets the depth limit): nesting depth, and how
#: many values aliases may expand the document to (a few hundred bytes of nested aliases
#: otherwise expand to billions).
YAML_MAX_DEPTH = 64
YAML_MAX_EXPANDED_VALUES = 100_000


#: libyaml's parser (when PyYAML has it) is several times faster than the pure-Python one; it
#: bounds nesting itself (1000 levels) and :func:`_check_expansion` applies ours.
_SAFE_BASE: Any = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class _BoundedLoader(_SAFE_BASE):
    """``yaml.SafeLoader`` (libyaml's when available) that refuses duplicate keys, nesting deeper
    than :data:`YAML_MAX_DEPTH`, recursive aliases and alias expansion beyond
    :data:`YAML_MAX_EXPANDED_VALUES` values (each as a ``yaml.YAMLError`` with a line)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # the pure-Python composer only
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {YAML_MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)} (first at line {first.start_mark.line + 1})", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: Any) -> None:
    """Refuse a document whose aliases make it expand to more than
    :data:`YAML_MAX_EXPANDED_VALUES` values (each shared node is visited once) or that contains
    itself. A long document without aliases is not refused: it costs what it weighs."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    first_shared: list[Any] = []

    def size(node: Any, depth: int = 1) -> int:
        if depth > YAML_MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nesting deeper than {YAML_MAX_DEPTH} levels", node.start_mark)
        key = id(node)
        if key in sizes:
            if not first_shared:
                first_shared.append(node)
            return sizes[key]
        if key in active:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to a value that contains it (a recursive structure)", node.start_mark
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        active.discard(key)
        sizes[key] = total
        return total

    total = size(root)
    if first_shared and total > max(YAML_MAX_EXPANDED_VALUES, len(sizes)):
        raise yaml.composer.ComposerError(
            None,
            None,
            f"aliases expand the document to {total:,} values (at most {YAML_MAX_EXPANDED_VALUES:,})",
            first_shared[0].start_mark,
        )


def _depth(data: Any) -> int:
    """How deeply lists and mappings nest in ``data`` (a tree: TOML has no aliases)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the limits of :class:`_BoundedLoader` (duplicate keys, depth,
    alias expansion); raises ``yaml.YAMLError``."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int() limit)
        raise yaml.constructor.ConstructorError(None, None, f"unreadable value: {str(exc).split(';')[0][:200]}") from None
    finally:
        loader.dispose()


def read_config_file(path: Path) -> dict:
    """Parse a YAML or TOML file into a mapping; syntax errors name the file and line."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES and path.is_file():
            raise ConfigError("", f"is {size:,} bytes; a config file may be at most {MAX_CONFIG_BYTES:,} bytes", source=str(path))
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
        except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int() limit)
            raise ConfigError("", f"invalid TOML: unreadable value: {str(exc).split(';')[0][:200]}", source=str(path)) from None
        except RecursionError:  # tomllib parses nested arrays and inline tables recursively
            raise ConfigError("", f"invalid TOML: nesting deeper than {YAML_MAX_DEPTH} levels", source=str(path)) from None
        if _depth(data) > YAML_MAX_DEPTH:
            raise ConfigError("", f"invalid TOML: nesting deeper than {YAML_MAX_DEPTH} levels", source=str(path))
    else:
        try:
            data = load_yaml(text)
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
            raise ConfigError(option("set"), f"expected KEY=VALUE like train.max_steps=10, got {short_repr(item)}")
        try:
            value = load_yaml(raw) if raw.strip() else ""
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


def recorded_plugin_options(
    run_config: Optional[Mapping], section: str, name: str, overrides: Sequence[str], names: Sequence[str] = ()
) -> dict:
    """The options of plugin ``name`` as a finished run's config records them in ``section``
    (``export``, ``eval``; its first entry of that name), with ``KEY=VALUE`` overrides applied:
    ``NAME.KEY=VALUE`` (NAME one of ``names``) applies to that plugin only, a plain ``KEY=VALUE``
    to every one (``qlora export --option``, ``qlora eval --option``)."""
    options: dict = {}
    for entry in (run_config or {}).get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            options = {k: v for k, v in entry.items() if k != "name"}
            break
    mine = []
    for item in overrides:
        first, dot, rest = item.partition(".")
        if dot and first in names and "=" not in first:
            if first == name:
                mine.append(rest)
        else:
            mine.append(item)
    return apply_overrides(options, mine) if mine else options


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
    if not part.isdecimal() or len(part) > 18 or int(part) > len(node) or (int(part) == len(node) and not allow_append):
        raise ConfigError(path, f"list index {short_repr(part)} is out of range (the list has {len(node)} items)")
    return int(part)


def _plugin_spec(section: str, value: Any, defaulted: bool) -> PluginSpec | None:
    """The section as written; a ``defaulted`` section without a name gets ``name=None`` (the
    registry's default), any other one needs a name."""
    if value is None:
        return PluginSpec(None, {}, section) if defaulted else None
    if isinstance(value, str):  # shorthand: `quantizer: nf4`
        return PluginSpec(value, {}, section)
    if not isinstance(value, Mapping):
        raise ConfigError(section, f"must be a mapping with a 'name' key, got {short_repr(value)}")
    options = dict(value)
    if "name" not in options and defaulted:
        return PluginSpec(None, options, section)
    name = options.pop("name", None)
    if name is None:
        raise ConfigError(f"{section}.name", "is required")
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name", f"must be a string, got {short_repr(name)}")
    return PluginSpec(name, options, section)


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Check the sections and build :class:`Config` (plugin options are checked later)."""
    src = str(source) if source else None
    try:
        for key in data:
            if key not in SECTIONS:
                hint = did_you_mean(str(key), SECTIONS)
                raise ConfigError(key_text(key), f"unknown section{hint}; sections are: {', '.join(SECTIONS)}")
        if "model" not in data:
            raise ConfigError("model", "is required (set model.path or model.source)")
        model = _section(ModelSection, data.get("model"), "model")
        train_raw = data.get("train")
        if isinstance(train_raw, Mapping) and train_raw.get("epochs") is not None and "max_steps" not in train_raw:
            train_raw = {**train_raw, "max_steps": None}  # epochs alone: do not let the max_steps default win
        train = _section(TrainSection, train_raw, "train")
        specs = {s: _plugin_spec(s, data.get(s), s in DEFAULTED_SECTIONS) for s in ("quantizer", "adapter", "optimizer", "data")}
        if "export" not in data:  # the default exporter (resolve_plugins drops it when there is none)
            exports: list = [PluginSpec(None, {}, "export[0]")]
        else:
            exports = _plugin_list(data["export"], "export", "exporters", "an exporter (e.g. `- name: adapter`)")
        track = _track_specs(data.get("track"))
        if train.enabled and specs["data"] is None:
            raise ConfigError("data", "is required when train.enabled is true")
        data_host = DataHostOptions()
        if specs["data"] is not None:
            data_options, data_host = split_host_options(specs["data"].options, "data")
            specs["data"] = attrs.evolve(specs["data"], options=data_options)
        evals = _eval_specs(data.get("eval"))
    except ConfigError as exc:
        if src and exc.source is None:
            raise ConfigError(exc.path, exc.message, source=src) from None
        raise
    base_dir = source.resolve().parent if source else Path.cwd()
    return Config(
        model,
        train,
        specs["quantizer"],
        specs["adapter"],
        specs["optimizer"],
        specs["data"],
        exports,
        source,
        base_dir,
        eval=evals,
        track=track,
        data_host=data_host,
    )


def _plugin_list(raw: Any, section: str, plural: str, one: str, example: str = "") -> list[PluginSpec]:
    """A section that lists plugins (``export``, ``eval``, ``track``): a list of names or
    mappings, or one of them; null: none. ``plural`` and ``one`` word the errors."""
    if raw is None:
        return []
    if isinstance(raw, (str, Mapping)):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(section, f"must be a list of {plural}{example}, got {short_repr(raw)}")
    specs = [_plugin_spec(f"{section}[{i}]", item, False) for i, item in enumerate(raw)]
    for i, spec in enumerate(specs):
        if spec is None:
            raise ConfigError(f"{section}[{i}]", f"must name {one}, got null")
    return specs  # type: ignore[return-value]


def _eval_specs(raw: Any) -> list[PluginSpec]:
    """The ``eval`` section: a list of evaluators (``- name: perplexity``), one mapping or a
    name; omitted or null: none."""
    return _plugin_list(raw, "eval", "evaluators", "an evaluator (e.g. `- name: perplexity`)")


# --- trackers (issue 14) ---------------------------------------------------------------------


def _track_specs(raw: Any) -> list[PluginSpec]:
    """The ``track`` section: a tracker name, a mapping, or a list of them (null: none listed)."""
    specs = _plugin_list(raw, "track", "trackers", "a tracker (e.g. `- name: tensorboard`)", " (e.g. [jsonl, tensorboard])")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"{spec.path}.name", f"duplicate tracker '{spec.name}'")
        seen.add(spec.name)
    return specs


def _resolve_trackers(config: Config, registry: Any, make: Any) -> list[Plugin]:
    """The listed trackers, with the kind's default (the run directory's metrics.jsonl) first
    when the list does not name it."""
    specs = list(config.track)
    default = registry.default("tracker")
    if default is not None and default not in {spec.name for spec in specs}:
        specs.insert(0, PluginSpec(default, {}, "track"))
    return [make("tracker", spec) for spec in specs]


# --- end of trackers -------------------------------------------------------------------------


def _section(cls: type, value: Any, path: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {short_repr(value)}")
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

    export = config.export
    if any(spec.name is None for spec in export):  # `export` omitted: the default exporter, if any
        default = registry.default("exporter")
        export = [attrs.evolve(spec, name=default) for spec in export if default is not None]
    seen: set[str] = set()
    for i, name in enumerate(spec.name for spec in export):
        if name in seen:
            raise ConfigError(f"export[{i}].name", f"duplicate exporter '{name}' (each exporter writes exports/{name}/)", source=src)
        seen.add(name)
    data: Optional[Plugin] = None
    if config.data is not None:
        sources = config.data_host.sources
        if not sources:
            data = make("data_format", config.data)
        else:  # the section's options once (errors name data.KEY), then each source's (data.sources[i].KEY)
            first = {**config.data.options, "path": sources[0].path}
            section = make("data_format", attrs.evolve(config.data, options=first))
            formats = [
                make(
                    "data_format",
                    PluginSpec(config.data.name, {**config.data.options, **s.options, "path": s.path}, f"data.sources[{i}]"),
                )
                for i, s in enumerate(sources)
            ]
            data = MixedSources(formats, sources, section.options)  # type: ignore[arg-type]
    return ResolvedPlugins(
        quantizer=make("quantizer", config.quantizer),
        adapter=make("adapter", config.adapter),
        optimizer=make("optimizer", config.optimizer),
        data=data,
        exporters=[make("exporter", spec) for spec in export],
        evaluators=_evaluators(config, make),
        trackers=_resolve_trackers(config, registry, make),
    )


def _evaluators(config: Config, make: Any) -> list[Plugin]:
    """The ``eval`` section's evaluators (names unique: results are keyed by name)."""
    seen: set[str] = set()
    for i, spec in enumerate(config.eval):
        if spec.name in seen:
            src = str(config.source) if config.source else None
            raise ConfigError(f"eval[{i}].name", f"duplicate evaluator '{spec.name}' (results are recorded by name)", source=src)
        seen.add(spec.name or "")
    return [make("evaluator", spec) for spec in config.eval]


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
        "track": [section(p) for p in plugins.trackers],
    }
    if config.model.path is not None and not is_hub_id(config.model.path, config.base_dir):
        out["model"]["path"] = str(config.resolve_path(config.model.path))
    if plugins.data is not None:
        host = config.data_host
        if isinstance(plugins.data, MixedSources):
            base = {k: v for k, v in out["data"].items() if k != "path"}
            out["data"] = {
                **base,
                "packing": host.packing,
                "sources": [_resolved_source(config, base, s, f) for s, f in zip(host.sources or [], plugins.data.formats)],
            }
        else:
            out["data"]["packing"] = host.packing
            if hasattr(plugins.data.options, "path"):
                out["data"]["path"] = str(config.resolve_path(plugins.data.options.path))
    if plugins.evaluators:  # only when there is an eval section (older run configs stay as they were)
        out["eval"] = [section(p) for p in plugins.evaluators]
        for entry in out["eval"]:
            if isinstance(entry.get("path"), str) and entry["path"]:
                entry["path"] = str(config.resolve_path(entry["path"]))
    return out


def _resolved_source(config: Config, base: dict, source: Any, fmt: Plugin) -> dict:
    """One resolved ``data.sources`` entry: its absolute path, its weight and the options in which
    it differs from the section."""
    own = {k: v for k, v in options_to_dict(fmt.options).items() if k != "path" and base.get(k) != v}
    entry = {"path": str(config.resolve_path(source.path)), **own}
    if source.weight is not None:
        entry["weight"] = source.weight
    return entry
