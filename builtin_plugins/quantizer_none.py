"""Builtin quantizer ``none``: keep the model in full precision (the plain LoRA baseline)."""

from __future__ import annotations

from typing import Any

from qlora_plugins import Quantizer, hookimpl


class NoQuantization(Quantizer):
    """No quantization: full-precision base weights (LoRA baseline)."""

    name = "none"

    def quantize_model(self, model: Any, skip_modules: Any) -> None:
        return None

    def metadata(self) -> dict:
        return {"format": "none"}

    def planned_bytes(self, numel: int) -> None:
        """Full precision: the planner counts the weights in the model dtype."""
        return None


@hookimpl
def register_quantizers(register):
    register(NoQuantization)
