"""Public API for the memory planner's plugin methods (``planned_*``): the types a quantizer, an
adapter or an optimizer receives or returns when ``qlora plan`` asks it (docs/plugins.md)."""

from qlora_plugins.core.planning import ActivationCoefficients, Architecture, LinearShape, StateBytes

__all__ = ["ActivationCoefficients", "Architecture", "LinearShape", "StateBytes"]
