"""A third-party quantizer for qlora-plugins: ``hqq4``, asymmetric int4 whose per-block scale and
zero are refined by a few rounds of least squares (in the spirit of HQQ), lowering weight MSE
below plain min/max int4. Written against the public contract only (``BlockwiseQuantizer``),
so LoRA training, merging, export and ``qlora quant-report`` work with it unchanged.

Use it with ``quantizer: {name: hqq4, blocksize: 64, iterations: 4}``.
"""

from __future__ import annotations

import attrs
import torch

from qlora_plugins import hookimpl
from qlora_plugins.options import in_range
from qlora_plugins.quantized import BlockwiseOptions, BlockwiseQuantizer


@attrs.define
class HQQ4Options(BlockwiseOptions):
    """Blockwise options plus the number of least-squares refinement rounds."""

    iterations: int = attrs.field(default=4, validator=in_range(0, 50))


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = -flat.numel() % blocksize
    if pad:  # repeat the last value: it changes neither min/max nor the fit much
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, blocksize)


class HQQ4(BlockwiseQuantizer):
    """HQQ-style int4: codes 0..15, per-block scale and zero fitted by least squares."""

    name = "hqq4"
    Options = HQQ4Options
    scale_keys = ("absmax", "offset")  # both per-block constants may be double-quantized
    # (``qlora plan`` needs nothing more: BlockwiseQuantizer.planned_bytes counts the packed codes
    # and one fp32 constant per scale key and block, or their double-quantized size)

    def encode_blocks(self, weight, blocksize):
        x = _blocks(weight.float(), blocksize)
        zero = x.min(dim=1).values
        scale = (x.max(dim=1).values - zero) / 15
        for _ in range(self.options.iterations + 1):
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.clamp(torch.round((x - zero[:, None]) / safe[:, None]), 0, 15)
            qc = q - q.mean(dim=1, keepdim=True)
            var = (qc * qc).sum(dim=1)
            fitted = (qc * (x - x.mean(dim=1, keepdim=True))).sum(dim=1) / torch.where(var > 0, var, torch.ones_like(var))
            scale = torch.where(var > 0, fitted, scale)
            zero = x.mean(dim=1) - scale * q.mean(dim=1)
        q = q.to(torch.uint8).view(-1)[: weight.numel()]
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        packed = (q[0::2] << 4) | q[1::2]
        return {"qweight": packed, "absmax": scale.contiguous(), "offset": zero.contiguous()}

    def decode_blocks(self, state, numel, blocksize, dtype):
        packed = state["qweight"]
        q = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:numel].float()
        block = torch.arange(numel, device=packed.device) // blocksize
        return (q * state["absmax"].float()[block] + state["offset"].float()[block]).to(dtype)


@hookimpl
def register_quantizers(register):
    register(HQQ4)
