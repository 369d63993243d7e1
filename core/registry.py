"""The plugin registry: a fresh pluggy manager per run, builtins and entry points, one table per kind.

Rules (documented in docs/plugins.md):

- Builtin plugin modules (``DEFAULT_PLUGINS``) register first, then the ``qlora_plugins``
  entry-point group in distribution-name order, then plugins passed in by the caller (tests).
- A name is taken by the first class that registers it. A later class with the same name is
  rejected and reported as a conflict, unless it sets ``replaces = True``, in which case it takes
  the name over (the replaced one is recorded). Nothing is ever silently shadowed.
- The default of a kind (what a config that omits the section gets) is the name of the first
  registered class that sets ``default = True`` in its own body (not inherited: a subclass of a
  default plugin is not a default unless it says so). A later class that sets it takes the default
  over only if it also sets ``replaces = True``; otherwise its claim is reported as a conflict
  (the class itself stays registered under its name).
- A plugin that fails to import, raises in a hook, implements a misspelt hook or registers an
  invalid class is recorded as broken with the distribution and entry point; the rest still load.
- ``QLORA_PLUGINS_DISABLE_AUTOLOAD=1`` skips entry points; ``QLORA_PLUGINS_BLOCK=a,b`` (or
  ``qlora --block NAME``) blocks plugins by entry-point or builtin module name.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import re
import signal
import sys
import threading
import traceback
from typing import Any, Iterable, Iterator, Sequence

import attrs
import pluggy

from qlora_plugins.core import hookspecs
from qlora_plugins.core.errors import PluginError, short_text
from qlora_plugins.core.interfaces import KINDS, Plugin
from qlora_plugins.core.options import build_options, did_you_mean

ENTRY_POINT_GROUP = "qlora_plugins"
ENV_DISABLE_AUTOLOAD = "QLORA_PLUGINS_DISABLE_AUTOLOAD"
ENV_BLOCK = "QLORA_PLUGINS_BLOCK"
DISTRIBUTION = "qlora-plugins"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "qlora_plugins.builtin_plugins.quantizer_formats",
    "qlora_plugins.builtin_plugins.quantizer_none",
    "qlora_plugins.builtin_plugins.adapter_lora",
    "qlora_plugins.builtin_plugins.optimizers",
    "qlora_plugins.builtin_plugins.exporter_adapter",
    "qlora_plugins.builtin_plugins.exporter_merged",
    "qlora_plugins.builtin_plugins.exporter_merged_4bit",
    "qlora_plugins.builtin_plugins.data_formats",
    "qlora_plugins.builtin_plugins.data_chat",
    "qlora_plugins.builtin_plugins.model_sources",
    "qlora_plugins.builtin_plugins.optimizer_offload",
    "qlora_plugins.builtin_plugins.adapter_full",
    "qlora_plugins.builtin_plugins.commands_plan",
    "qlora_plugins.builtin_plugins.commands_bench",
    # --- issue 14, generate/eval branch ---
    "qlora_plugins.builtin_plugins.evaluator_perplexity",
    "qlora_plugins.builtin_plugins.evaluator_lm_eval",
    "qlora_plugins.builtin_plugins.commands_generate",
    "qlora_plugins.builtin_plugins.commands_eval",
    # --- end generate/eval ---
    "qlora_plugins.builtin_plugins.commands_data",
    # --- trackers (issue 14) ---
    "qlora_plugins.builtin_plugins.tracker_jsonl",
    "qlora_plugins.builtin_plugins.tracker_tensorboard",
    "qlora_plugins.builtin_plugins.tracker_mlflow",
    "qlora_plugins.builtin_plugins.tracker_wandb",
    # --- end of trackers ---
)

HOOKS: dict[str, str] = {
    "quantizer": "register_quantizers",
    "adapter": "register_adapters",
    "optimizer": "register_optimizers",
    "exporter": "register_exporters",
    "data_format": "register_data_formats",
    "model_source": "register_model_sources",
    # --- issue 14, generate/eval branch: evaluators ---
    "evaluator": "register_evaluators",
    # --- end evaluators ---
    "tracker": "register_trackers",  # trackers (issue 14)
}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@attrs.define(frozen=True)
class PluginSource:
    """Where a plugin module came from: builtin module or entry point, with its distribution."""

    name: str
    distribution: str
    version: str
    builtin: bool
    entry_point: str | None = None

    def describe(self) -> str:
        where = f"entry point '{self.entry_point}'" if self.entry_point else f"module '{self.name}'"
        return f"{where} of distribution '{self.distribution}' {self.version}"


@attrs.define
class Registration:
    """One registered plugin class."""

    kind: str
    name: str
    cls: type
    source: PluginSource
    replaced: list["Registration"] = attrs.field(factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
            "distribution": self.source.distribution,
            "version": self.source.version,
            "plugin": self.source.name,
            "builtin": self.source.builtin,
            "description": self.cls.summary(),
            "replaces": [f"{r.source.distribution}:{r.name}" for r in self.replaced],
        }


@attrs.define
class BrokenPlugin:
    """A plugin (or one of its registrations) that could not be used, and why."""

    source: PluginSource
    stage: str  # import | hook | conflict | invalid
    error: str
    kind: str | None = None
    name: str | None = None

    def message(self) -> str:
        what = f"{self.kind} '{self.name}' from " if self.name else ""
        return f"{what}{self.source.describe()}: {self.error}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "plugin": self.source.name,
            "distribution": self.source.distribution,
            "version": self.source.version,
            "entry_point": self.source.entry_point,
            "stage": self.stage,
            "kind": self.kind,
            "name": self.name,
            "error": self.error,
        }


def _own_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        import qlora_plugins

        return qlora_plugins.__version__


def _short_error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what is written to stdout meanwhile to stderr: ``sys.stdout`` and, when stdout is the
    process's own, file descriptor 1 too (so that writes from C code and ``os.write(1, ...)``
    follow). Keeps stdout for what a command means to print there (``--json`` documents)."""
    saved_fd = None
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        pass
    try:
        if sys.stdout is not None and sys.stdout.fileno() == 1 and sys.stderr is not None and sys.stderr.fileno() == 2:
            saved_fd = os.dup(1)
            os.dup2(2, 1)
    except (OSError, ValueError, AttributeError, TypeError):  # not a real file (tests, embedding)
        saved_fd = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved_fd is not None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError, AttributeError):
                pass
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


class _PluginCode:
    """Guard around code of plugins (imports, ``register_*`` hooks, ``register_commands``).

    - What plugin code prints goes to stderr: stdout belongs to the command (``--json``).
    - Every exception it raises is contained, ``SystemExit`` and ``KeyboardInterrupt`` included:
      a plugin that calls ``sys.exit()`` or raises ``KeyboardInterrupt`` at import is a broken
      plugin like any other. A real Ctrl-C (SIGINT) that arrives meanwhile is told apart by a
      signal handler installed for the duration, and is re-raised.
    """

    def __init__(self) -> None:
        self.interrupted = False

    @contextlib.contextmanager
    def running(self) -> Iterator["_PluginCode"]:
        previous = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGINT) is signal.default_int_handler:

                    def on_sigint(signum: int, frame: Any) -> None:
                        self.interrupted = True
                        raise KeyboardInterrupt

                    previous = signal.signal(signal.SIGINT, on_sigint)
            except (ValueError, OSError, AttributeError):  # no signals here (e.g. embedded)
                previous = None
        try:
            with stdout_to_stderr():
                yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def contain(self, exc: BaseException) -> None:
        """Re-raise a real Ctrl-C; anything else plugin code raised is the caller's to record."""
        if isinstance(exc, KeyboardInterrupt) and self.interrupted:
            raise exc
        if isinstance(exc, GeneratorExit):
            raise exc


class Registry:
    """Tables of registered plugin classes by kind, plus what was broken or blocked."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.tables: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self.defaults: dict[str, str] = {}
        self.broken: list[BrokenPlugin] = []
        self.blocked: list[str] = []
        self.sources: dict[str, PluginSource] = {}

    # lookups ------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return sorted(self.tables[kind])

    def registrations(self, kind: str | None = None) -> list[Registration]:
        """All registrations (of one kind, if given), sorted by kind then name."""
        kinds = [kind] if kind else list(self.tables)
        return [self.tables[k][n] for k in kinds for n in sorted(self.tables[k])]

    def in_order(self, kind: str) -> list[Registration]:
        """Registrations of ``kind`` in the order their names were first registered (builtins
        first, then entry points, then plugins passed in); a replacement keeps the name's place."""
        return list(self.tables[kind].values())

    def default(self, kind: str) -> str | None:
        """The name of ``kind``'s default plugin (the first registered class with
        ``default = True``, unless a later one took it over with ``replaces = True``), or None
        when no registered class claims it."""
        name = self.defaults.get(kind)
        return name if name in self.tables.get(kind, {}) else None

    def get(self, kind: str, name: str, config_path: str | None = None) -> type[Plugin]:
        """The class registered as ``name`` for ``kind``.

        :raises PluginError: naming the available plugins and the closest match.
        """
        if kind not in self.tables:
            raise PluginError(f"unknown plugin kind '{kind}'{did_you_mean(kind, self.tables)}")
        table = self.tables[kind]
        if name in table:
            return table[name].cls
        label = kind.replace("_", " ")
        where = f"{config_path}: " if config_path else ""
        broken = [b for b in self.broken if b.kind == kind and b.name == name]
        if broken:
            raise PluginError(f"{where}{label} '{short_text(name)}' is broken: {broken[0].message()}")
        available = ", ".join(sorted(table)) or "none"
        suspects = [b for b in self.broken if b.stage in ("import", "hook") and b.kind in (None, kind)]
        hint = f"; it may come from a plugin that failed to load: {suspects[0].message()}" if suspects else ""
        raise PluginError(f"{where}unknown {label} '{short_text(name)}'{did_you_mean(str(name), table)}; available: {available}{hint}")

    def registration(self, kind: str, name: str) -> Registration:
        self.get(kind, name)
        return self.tables[kind][name]

    def create(self, kind: str, name: str | None, options: dict | None = None, config_path: str = "") -> Plugin:
        """Instantiate plugin ``name`` of ``kind`` (None: the kind's :meth:`default`) with
        ``options`` validated by its Options class.

        :raises PluginError: unknown name, or no default. :raises ConfigError: bad options
            (path-qualified).
        """
        if name is None:
            name = self.default(kind)
            if name is None:
                where = f"{config_path}.name: " if config_path else ""
                label = kind.replace("_", " ")
                raise PluginError(
                    f"{where}no {label} plugin declares itself the default; name one "
                    f"(available: {', '.join(sorted(self.tables.get(kind, {}))) or 'none'})"
                )
        cls = self.get(kind, name, f"{config_path}.name" if config_path else None)
        built = build_options(cls.Options, options or {}, config_path)
        return cls(built)

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add CLI subcommands (``register_commands``); faults are contained."""
        guard = _PluginCode()
        with guard.running():
            for impl in self.pm.hook.register_commands.get_hookimpls():
                source = self.sources.get(impl.plugin_name)
                try:
                    impl.function(cli=cli)
                except BaseException as exc:  # a broken plugin must not take the CLI down (SystemExit neither)
                    guard.contain(exc)
                    if source is not None:
                        self.broken.append(BrokenPlugin(source, "hook", f"register_commands raised {_short_error(exc)}"))

    # registration -------------------------------------------------------------------------

    def _register_module(self, plugin: object, source: PluginSource) -> None:
        if self.pm.is_blocked(source.name):
            self.blocked.append(source.name)
            return
        try:
            self.pm.register(plugin, name=source.name)
        except Exception as exc:  # e.g. a hookimpl with wrong arguments (no plugin code runs here)
            self.broken.append(BrokenPlugin(source, "invalid", _short_error(exc)))
            return
        self.sources[source.name] = source
        known = set(HOOKS.values()) | {"register_commands"}
        for attr in dir(plugin):
            marker = getattr(getattr(plugin, attr, None), "qlora_plugins_impl", None)
            if marker is not None and attr not in known:
                hint = did_you_mean(attr, sorted(known))
                self.broken.append(BrokenPlugin(source, "invalid", f"implements unknown hook '{attr}'{hint}"))
                self.pm.unregister(name=source.name)
                del self.sources[source.name]
                return

    def _collect(self, guard: "_PluginCode") -> None:
        order = {name: i for i, name in enumerate(self.sources)}
        for kind, hook_name in HOOKS.items():
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            for impl in sorted(impls, key=lambda i: order.get(i.plugin_name, len(order))):
                source = self.sources[impl.plugin_name]
                try:
                    impl.function(register=lambda cls, _k=kind, _s=source: self._add(_k, cls, _s))
                except BaseException as exc:
                    guard.contain(exc)
                    self.broken.append(BrokenPlugin(source, "hook", f"{hook_name} raised {_short_error(exc)}"))

    def _add(self, kind: str, cls: Any, source: PluginSource) -> None:
        base = KINDS[kind]
        name = getattr(cls, "name", None)
        label = getattr(cls, "__name__", repr(cls))
        if not (isinstance(cls, type) and issubclass(cls, base)):
            problem = f"registered {label}, which is not a subclass of {base.__name__}"
        elif not isinstance(name, str) or not _NAME_RE.match(name):
            problem = f"{label}.name must be a lowercase name like 'my_quant', got {name!r}"
        elif not attrs.has(cls.Options):
            problem = f"{label}.Options must be an attrs class"
        else:
            problem = None
        if problem:
            self.broken.append(BrokenPlugin(source, "invalid", problem, kind, name if isinstance(name, str) else None))
            return
        table = self.tables[kind]
        existing = table.get(name)
        if existing is None:
            table[name] = Registration(kind, name, cls, source)
        elif existing.cls is cls:
            return  # the same class registered twice: the host deduplicates
        elif getattr(cls, "replaces", False):
            table[name] = Registration(kind, name, cls, source, replaced=[existing, *existing.replaced])
        else:
            self.broken.append(
                BrokenPlugin(
                    source,
                    "conflict",
                    f"name already registered by {existing.source.describe()}; set `replaces = True` on the class to take it over",
                    kind,
                    name,
                )
            )
            return
        if vars(cls).get("default") is True:  # declared by the class itself: a subclass of a default is not one
            self._claim_default(kind, name, cls, source)

    def _claim_default(self, kind: str, name: str, cls: type, source: PluginSource) -> None:
        current = self.defaults.get(kind)
        if current is None or current == name or getattr(cls, "replaces", False):
            self.defaults[kind] = name
            return
        holder = self.tables[kind][current].source.describe()
        self.broken.append(
            BrokenPlugin(
                source,
                "conflict",
                f"claims to be the default {kind.replace('_', ' ')}, which '{current}' from {holder} already is; "
                f"set `replaces = True` on the class to take the default over (it stays registered as '{name}')",
                kind,
                name,
            )
        )


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: ((ep.dist.name if ep.dist else "").lower(), ep.name))


def autoload_enabled() -> bool:
    """Whether entry points load (``QLORA_PLUGINS_DISABLE_AUTOLOAD`` unset or false)."""
    return os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes", "on")


def blocked_from_env() -> list[str]:
    """Plugin names listed in ``QLORA_PLUGINS_BLOCK`` (comma separated)."""
    return [n.strip() for n in os.environ.get(ENV_BLOCK, "").split(",") if n.strip()]


def create_registry(
    *,
    load_entrypoints: bool | None = None,
    blocked: Iterable[str] = (),
    plugins: Sequence[object] = (),
) -> Registry:
    """Build a fresh plugin manager and registry.

    :param load_entrypoints: load the ``qlora_plugins`` entry-point group (default: unless
        ``QLORA_PLUGINS_DISABLE_AUTOLOAD`` is set).
    :param blocked: plugin names (builtin module or entry-point names) not to load, in addition to
        ``QLORA_PLUGINS_BLOCK``.
    :param plugins: extra plugin objects (modules or instances) registered last, e.g. in tests.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in [*blocked_from_env(), *blocked]:
        pm.set_blocked(name)
    registry = Registry(pm)
    version = _own_version()
    guard = _PluginCode()
    with guard.running():
        for module_name in DEFAULT_PLUGINS:
            source = PluginSource(module_name, DISTRIBUTION, version, builtin=True)
            if pm.is_blocked(module_name):
                registry.blocked.append(module_name)
                continue
            try:
                module = importlib.import_module(module_name)
            except BaseException as exc:  # an optional dependency of a builtin may be missing
                guard.contain(exc)
                registry.broken.append(BrokenPlugin(source, "import", _short_error(exc)))
                continue
            registry._register_module(module, source)

        if load_entrypoints if load_entrypoints is not None else autoload_enabled():
            for ep in _entry_points():
                dist = ep.dist
                source = PluginSource(
                    ep.name,
                    dist.name if dist else "unknown",
                    dist.version if dist else "unknown",
                    builtin=False,
                    entry_point=f"{ep.name} = {ep.value}",
                )
                if pm.is_blocked(ep.name):
                    registry.blocked.append(ep.name)
                    continue
                if ep.name in registry.sources:
                    registry.broken.append(BrokenPlugin(source, "conflict", f"plugin name '{ep.name}' is already in use"))
                    continue
                try:
                    obj = ep.load()
                except BaseException as exc:  # SystemExit and KeyboardInterrupt from plugin code too
                    guard.contain(exc)
                    registry.broken.append(BrokenPlugin(source, "import", _short_error(exc)))
                    continue
                registry._register_module(obj, source)

        for i, obj in enumerate(plugins):
            name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
            source = PluginSource(name, getattr(obj, "__distribution__", "local"), "0", builtin=False)
            registry._register_module(obj, source)

        registry._collect(guard)
    return registry
