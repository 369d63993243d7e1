"""peft LoRA layer for :class:`qlora_plugins.quantized.QuantLinear`, registered with peft through
``LoraConfig._register_custom_module`` (peft's documented route for custom layer types).

Forward adds the low-rank update to the quantized base's output; merge dequantizes the base, adds
``B @ A * scaling`` and re-quantizes with the layer's own format, so any blockwise format (ours or a
third party's) trains and merges the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge


class QuantLoraLinear(torch.nn.Module, LoraLayer):
    """LoRA on top of a QuantLinear base layer."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _apply_delta(self, adapters: list[str], sign: float, safe: bool) -> None:
        base = self.get_base_layer()
        weight = base.dequantize(torch.float32)
        for adapter in adapters:
            weight = weight + sign * self.get_delta_weight(adapter).to(weight)
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights of {base.layer_name}")
        base.requantize(weight.to(base.compute_dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapters:
            return
        self._apply_delta(adapters, 1.0, safe_merge)
        self.merged_adapters.extend(adapters)

    def unmerge(self) -> None:
        adapters = [a for a in self.merged_adapters if a in self.lora_A]
        if adapters:
            self._apply_delta(adapters, -1.0, False)
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            h = self.lora_dropout[adapter](x.to(lora_A.weight.dtype))
            result = result + (lora_B(lora_A(h)) * self.scaling[adapter]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
