"""Public API for quantizer authors: the blockwise base class and the scale quantizer.
``QuantLinear`` lives in :mod:`qlora_plugins.quant_linear` (it imports torch)."""

from qlora_plugins.core.quantized import BlockwiseOptions, BlockwiseQuantizer, DynamicScaleQuantizer, ScaleQuantizer

__all__ = ["BlockwiseOptions", "BlockwiseQuantizer", "DynamicScaleQuantizer", "ScaleQuantizer"]
