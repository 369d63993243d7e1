"""Builtin exporter ``merged``: dequantize the base, merge the adapter, save a standard
transformers checkpoint (safetensors + tokenizer) in fp32, bf16 or fp16.

The result needs neither qlora-plugins nor peft nor bitsandbytes:
``AutoModelForCausalLM.from_pretrained(dir)`` (or the task's Auto class) loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from qlora_plugins import ExportContext, Exporter, hookimpl
from qlora_plugins.exporting import ExportOptions, merged_model

#: Default tolerance per dtype: fp32 differs from the trained model only by summation order;
#: 16-bit dtypes round every weight (bf16 keeps 8 bits of mantissa, fp16 11).
TOLERANCES = {
    "float32": {"max_kl": 1e-5, "min_top1": 0.99},
    "float16": {"max_kl": 1e-3, "min_top1": 0.98},
    "bfloat16": {"max_kl": 5e-3, "min_top1": 0.95},
}


@attrs.define
class MergedOptions(ExportOptions):
    """``dtype`` of the saved weights, plus the options every verified exporter takes."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class MergedExporter(Exporter):
    """Dequantized base + merged adapter as a standard transformers checkpoint (fp32/bf16/fp16)."""

    name = "merged"
    Options = MergedOptions

    def default_tolerance(self) -> dict:
        return dict(TOLERANCES[self.options.dtype])

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        import torch

        dtype = getattr(torch, self.options.dtype)
        model = merged_model(context.model, context.adapter, dtype, context.base_model_path)
        model.save_pretrained(str(output_dir), safe_serialization=True)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(str(output_dir))
        params = sum(p.numel() for p in model.parameters())
        del model
        return {"format": "transformers", "dtype": self.options.dtype, "parameters": params}


@hookimpl
def register_exporters(register):
    register(MergedExporter)
