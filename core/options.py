"""Build attrs options classes from plain config mappings, with errors that name the config path.

Plugins declare their options as ``@attrs.define`` classes with type annotations and validators.
:func:`build_options` checks unknown keys (suggesting the closest valid one), value types
(``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``Optional``, ``Literal``, unions) and runs
the validators, turning every failure into a :class:`~qlora_plugins.errors.ConfigError` such as
``quantizer.blocksize: must be a power of two in [32, 4096], got 100``.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar, Union

import attrs

from qlora_plugins.core.errors import ConfigError, short_repr

T = TypeVar("T")

_MISSING = object()


def key_text(key: Any) -> str:
    """A config key as it appears in an error's dotted path, bounded like :func:`short_repr`."""
    text = key if isinstance(key, str) else short_repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (for "did you mean" hints), or None."""
    name = str(name)
    if len(name) > 200:  # nothing valid is that long, and difflib's cost grows with the length
        return None
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix, or an empty string."""
    match = closest(name, candidates)
    return f" (did you mean '{match}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp) or (tp if tp in (list, tuple, dict) else None)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, typing.Mapping):
        return "a mapping"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` checked (and mildly coerced, e.g. int -> float) against annotation ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp) or (tp if tp in (list, tuple, dict) else None)  # bare `list`, `dict`
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        hint = did_you_mean(value, [str(a) for a in allowed]) if isinstance(value, str) else ""
        raise ConfigError(path, f"must be {_type_name(tp)}, got {short_repr(value)}{hint}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"must be {_type_name(tp)}, got {short_repr(value)}")
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be {_type_name(tp)}, got {short_repr(value)}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a mapping, got {short_repr(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {short_repr(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"must be an integer, got {short_repr(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads "1e-4" as a string
                number = float(value)
            except (ValueError, OverflowError):
                number = float("inf") if isinstance(value, int) else None
        if number is None:
            raise ConfigError(path, f"must be a number, got {short_repr(value)}")
        if not math.isfinite(number):  # NaN passes every range check, so refuse it here
            raise ConfigError(path, f"must be a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {short_repr(value)}")
    if isinstance(tp, type) and attrs.has(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a mapping, got {short_repr(value)}")
        return build_options(tp, value, path)
    return value


def build_options(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Instantiate attrs class ``cls`` from ``data``; every error names ``path.key``.

    :raises ConfigError: for unknown keys, missing required keys, wrong types and failed validators.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    public = {f.alias or f.name: f for f in fields.values() if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in public:
            known = sorted(public)
            hint = did_you_mean(str(key), known)
            valid = f"; valid keys: {', '.join(known)}" if known and not hint else ""
            raise ConfigError(f"{prefix}{key_text(key)}", f"unknown key{hint}{valid}")
    kwargs = {}
    for key, field in public.items():
        if key in data:
            kwargs[key] = _coerce(data[key], hints.get(field.name, Any), f"{prefix}{key}")
        elif field.default is attrs.NOTHING:
            raise ConfigError(f"{prefix}{key}", "is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        key = getattr(exc, "config_key", None)
        message = str(exc)
        if key is None:  # attrs validators raise with the attribute as second argument
            attr = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], attrs.Attribute) else None
            key = attr.name if attr else ""
            message = exc.args[0] if attr else message
        raise ConfigError(f"{prefix}{key}".rstrip("."), message) from None


def options_to_dict(options: Any) -> dict[str, Any]:
    """The options as a plain mapping (what the resolved config records)."""
    if options is None:
        return {}
    return attrs.asdict(options, recurse=True)


def check_range(path: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """Raise ConfigError naming ``path`` (a config key or a command-line option such as
    ``--batch``) unless ``low <= value <= high`` and ``value`` is finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"must be a finite number, got {short_repr(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(path, f"must be in [{lo}, {hi}], got {short_repr(value)}")


# Validators: each raises ValueError(message, attribute) so build_options can name the path.


def _fail(attribute: attrs.Attribute, message: str) -> typing.NoReturn:
    raise ValueError(message, attribute)


def in_range(low: float | None = None, high: float | None = None) -> Callable[[Any, attrs.Attribute, Any], None]:
    """attrs validator: ``low <= value <= high`` (either bound may be None); None values pass."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            _fail(attribute, f"must be in [{lo}, {hi}], got {short_repr(value)}")

    return check


def positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: value > 0 (None passes)."""
    if value is not None and value <= 0:
        _fail(attribute, f"must be > 0, got {short_repr(value)}")


def power_of_two(low: int, high: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    """attrs validator: a power of two in ``[low, high]``."""

    def check(_instance: Any, attribute: attrs.Attribute, value: int) -> None:
        if not (low <= value <= high) or value & (value - 1):
            _fail(attribute, f"must be a power of two in [{low}, {high}], got {short_repr(value)}")

    return check


def one_of(*choices: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """attrs validator: value is one of ``choices`` (suggests the closest on a typo)."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            hint = did_you_mean(str(value), choices)
            _fail(attribute, f"must be one of {', '.join(choices)}, got {short_repr(value)}{hint}")

    return check
