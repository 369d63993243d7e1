"""Public re-export of :class:`QuantLinear` (imports torch)."""

from qlora_plugins.core.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
