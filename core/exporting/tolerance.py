"""The options every verified exporter takes, and the fidelity tolerance: defaults, overrides
and the check of measured figures against their bounds."""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs

from qlora_plugins.core.errors import ExportError
from qlora_plugins.core.exporting.paths import check_name
from qlora_plugins.core.interfaces import GENERIC_TOLERANCE  # noqa: F401  (re-exported)
from qlora_plugins.core.options import in_range


def _bound(figure: str, kind: str, low: float, high: float | None):
    return attrs.field(default=None, validator=in_range(low, high), metadata={"figure": figure, "bound": kind})


@attrs.define
class Tolerance:
    """Limits on the fidelity figures; unset fields take the exporter's defaults.

    Each field bounds one figure (its ``metadata``: ``figure`` and ``bound``, ``max`` or ``min``).
    An exporter with figures of its own subclasses this class and adds fields the same way.
    Set a bound out of reach (``max_kl: 1e9``, ``min_top1: 0``) to switch that check off.
    """

    max_kl: Optional[float] = _bound("kl", "max", 0.0, None)
    min_top1: Optional[float] = _bound("top1", "min", 0.0, 1.0)
    max_abs_diff: Optional[float] = _bound("max_abs_diff", "max", 0.0, None)
    max_mean_abs_diff: Optional[float] = _bound("mean_abs_diff", "max", 0.0, None)


@attrs.define
class ExportOptions:
    """Options of every verified exporter (subclass it for an exporter's own options).

    :param tolerance: limits on the fidelity figures (unset ones: the exporter's defaults).
    :param verify: reload the artifact and measure fidelity (off: recorded as skipped).
    :param directory: sub-directory of the exports directory (default: the exporter's name); one
        plain name, so that two exports of the same exporter can coexist.
    :param probe_text: compare on this text instead of held-out training examples.
    """

    tolerance: Tolerance = attrs.field(factory=Tolerance)
    verify: bool = True
    directory: Optional[str] = attrs.field(default=None)
    probe_text: Optional[str] = None

    @directory.validator
    def _check_directory(self, attribute: attrs.Attribute, value: Optional[str]) -> None:
        if value is not None:
            try:
                check_name(value)
            except ExportError as exc:
                raise ValueError(str(exc), attribute) from None


def _tolerance_fields(tolerance: Any) -> dict[str, tuple[str, str]]:
    return {
        f.name: (f.metadata.get("figure", f.name), f.metadata.get("bound", "max"))
        for f in attrs.fields(type(tolerance))
        if "figure" in f.metadata
    }


def effective_tolerance(exporter: Any) -> dict:
    """The exporter's default tolerance updated with the fields set in its ``tolerance`` option."""
    tolerance = dict(exporter.default_tolerance())
    configured = getattr(exporter.options, "tolerance", None)
    if configured is not None and attrs.has(type(configured)):
        for name in _tolerance_fields(configured):
            value = getattr(configured, name)
            if value is not None:
                tolerance[name] = value
    return tolerance


def _bounds(exporter: Any) -> dict[str, tuple[str, str]]:
    configured = getattr(exporter.options, "tolerance", None)
    fields = _tolerance_fields(configured) if configured is not None and attrs.has(type(configured)) else {}
    return {**_tolerance_fields(Tolerance()), **fields}


def violations(figures: dict, tolerance: dict, bounds: dict[str, tuple[str, str]]) -> list[str]:
    """Human-readable list of the bounds in ``tolerance`` that ``figures`` exceed."""
    out = []
    for key, limit in tolerance.items():
        figure, kind = bounds.get(key, (key[4:], key[:3]) if key[:4] in ("max_", "min_") else (key, "max"))
        value = figures.get(figure)
        if value is None or limit is None:
            continue
        bad = (value > limit or math.isnan(value)) if kind == "max" else (value < limit or math.isnan(value))
        if bad:
            out.append(f"{figure} {_fmt(value)} {'>' if kind == 'max' else '<'} {key} {_fmt(limit)}")
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)
