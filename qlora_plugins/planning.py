"""Public API of the memory planner: the types a quantizer, an adapter or an optimizer receives or
returns when ``qlora plan`` asks it (``planned_*`` methods, docs/plugins.md), and the planner
itself for programs and plugin commands (``qlora plan`` is one)."""

from qlora_plugins.core.planner import (
    Plan,
    Settings,
    check_budget,
    format_plan,
    load_architecture,
    make_plan,
    parse_size,
    plan_dict,
    quantizer_table,
)
from qlora_plugins.core.planning import ActivationCoefficients, Architecture, LinearShape, StateBytes

__all__ = [
    "ActivationCoefficients",
    "Architecture",
    "LinearShape",
    "Plan",
    "Settings",
    "StateBytes",
    "check_budget",
    "format_plan",
    "load_architecture",
    "make_plan",
    "parse_size",
    "plan_dict",
    "quantizer_table",
]
