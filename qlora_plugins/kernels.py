"""Public access to the blockwise quantization kernels (bitsandbytes-compatible nf4/fp4, affine
int4, 8-bit double quantization): see :mod:`qlora_plugins.core.kernels` for the exact formulas."""

from qlora_plugins.core.kernels import (
    backend_name,
    dequantize_4bit_int,
    dequantize_4bit_lut,
    dequantize_blockwise_8bit,
    double_dequantize,
    double_quantize,
    dynamic_map_8bit,
    fp4_code,
    int4_code,
    nf4_code,
    quantize_4bit_int,
    quantize_4bit_lut,
    quantize_blockwise_8bit,
)

__all__ = [
    "backend_name",
    "dequantize_4bit_int",
    "dequantize_4bit_lut",
    "dequantize_blockwise_8bit",
    "double_dequantize",
    "double_quantize",
    "dynamic_map_8bit",
    "fp4_code",
    "int4_code",
    "nf4_code",
    "quantize_4bit_int",
    "quantize_4bit_lut",
    "quantize_blockwise_8bit",
]
