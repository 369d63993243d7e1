"""qlora-myplugin: a plugin package for qlora-plugins, made from the plugin template.

It provides two plugins, one of each kind that third parties write most often:

- ``myplugin_int4``, a quantizer: symmetric 4-bit integers in [-7, 7], one fp32 scale (absmax / 7)
  per block, two codes packed per byte. ``quantizer: {name: myplugin_int4, blocksize: 64}``.
- ``myplugin_weights``, an exporter: the trained (adapter) tensors as one safetensors file, checked
  after writing by reading the file back. ``export: [{name: myplugin_weights, dtype: float16}]``.

Only the public API is imported (``qlora_plugins``, ``qlora_plugins.options``,
``qlora_plugins.quantized``, ``qlora_plugins.exporting``), never ``qlora_plugins.core``. torch and
safetensors are imported inside the methods, so that listing plugins (``qlora plugins``, which
imports every plugin module) stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import attrs

from qlora_plugins import ExportContext, Exporter, hookimpl
from qlora_plugins.exporting import ExportOptions, Tolerance
from qlora_plugins.options import in_range
from qlora_plugins.quantized import BlockwiseOptions, BlockwiseQuantizer

__version__ = "0.1.0"

# --- the quantizer -------------------------------------------------------------------------


@attrs.define
class MyPluginInt4Options(BlockwiseOptions):
    """Options of myplugin_int4: the blockwise ones (blocksize, double_quant, compute_dtype,
    skip_modules) plus the largest code used (7: codes in [-7, 7])."""

    max_code: int = attrs.field(default=7, validator=in_range(1, 7))


class MyPluginInt4(BlockwiseQuantizer):
    """Symmetric int4 (codes in [-max_code, max_code]), absmax scale per block, two codes a byte."""

    name = "myplugin_int4"
    Options = MyPluginInt4Options
    scale_keys = ("absmax",)  # per-block fp32 constants that double quantization compresses

    def encode_blocks(self, weight: Any, blocksize: int) -> dict:
        """Quantize a flat fp32/bf16/fp16 weight into ``qweight`` (uint8, two codes a byte, the
        first in the high nibble) and ``absmax`` (fp32, one per block)."""
        import torch

        n = weight.numel()
        blocks = torch.nn.functional.pad(weight.float(), (0, -n % blocksize)).view(-1, blocksize)
        absmax = blocks.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / self.options.max_code, torch.ones_like(absmax))
        codes = torch.round(blocks / scale[:, None]).clamp_(-self.options.max_code, self.options.max_code)
        nibbles = (codes.to(torch.int16) + 8).to(torch.uint8).view(-1)[:n]
        nibbles = torch.nn.functional.pad(nibbles, (0, n % 2))
        return {"qweight": (nibbles[0::2] << 4) | nibbles[1::2], "absmax": absmax.contiguous()}

    def decode_blocks(self, state: dict, numel: int, blocksize: int, dtype: Any) -> Any:
        """The inverse of :meth:`encode_blocks`: ``numel`` weights in ``dtype``."""
        import torch

        packed = state["qweight"]
        codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:numel].float() - 8
        scale = state["absmax"].float() / self.options.max_code
        block = torch.arange(numel, device=packed.device) // blocksize
        return (codes * scale[block]).to(dtype)


# --- the exporter --------------------------------------------------------------------------


@attrs.define
class MyPluginTolerance(Tolerance):
    """The generic bounds plus one on this exporter's own figure, ``tensor_rel_error``."""

    max_tensor_rel_error: Optional[float] = attrs.field(
        default=None, validator=in_range(0.0, None), metadata={"figure": "tensor_rel_error", "bound": "max"}
    )


@attrs.define
class MyPluginWeightsOptions(ExportOptions):
    """Options of myplugin_weights: every verified exporter's (tolerance, verify, directory,
    probe_text) plus the dtype of the saved tensors."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    tolerance: MyPluginTolerance = attrs.field(factory=MyPluginTolerance)


WEIGHTS_FILE = "weights.safetensors"


def _trainable(model: Any) -> dict:
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


class MyPluginWeights(Exporter):
    """The trained tensors (the adapter) as one safetensors file, verified by reading it back."""

    name = "myplugin_weights"
    Options = MyPluginWeightsOptions

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        """Write ``weights.safetensors`` into the empty ``output_dir``; return facts for the report."""
        import torch
        from safetensors.torch import save_file

        dtype = getattr(torch, self.options.dtype)
        tensors = {name: t.to("cpu", dtype).contiguous() for name, t in _trainable(context.model).items()}
        save_file(tensors, str(output_dir / WEIGHTS_FILE), metadata={"dtype": self.options.dtype})
        return {"format": "safetensors", "tensors": len(tensors), "dtype": self.options.dtype}

    def verify(self, directory: Path, context: ExportContext) -> dict:
        """The host calls this after ``export`` with the written directory: figures of our own.
        ``tensor_rel_error``: the largest ``max|saved - trained| / max|trained|`` over the tensors."""
        from safetensors.torch import load_file

        saved = load_file(str(directory / WEIGHTS_FILE))
        worst = 0.0
        for name, trained in _trainable(context.model).items():
            reference = trained.float().cpu()
            scale = float(reference.abs().max()) or 1.0
            worst = max(worst, float((saved[name].float() - reference).abs().max()) / scale)
        return {"tensor_rel_error": worst}

    def default_tolerance(self) -> dict:
        """Bounds used unless the config sets ``tolerance``: exact in fp32, the rounding of the
        narrower dtypes otherwise (fp16 keeps 11 bits of mantissa, bf16 8)."""
        return {"max_tensor_rel_error": {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3}[self.options.dtype]}


# --- the hooks -----------------------------------------------------------------------------


@hookimpl
def register_quantizers(register: Any) -> None:
    register(MyPluginInt4)


@hookimpl
def register_exporters(register: Any) -> None:
    register(MyPluginWeights)
