"""Builtin adapter ``full``: full fine-tuning, every floating-point parameter of the unquantized
model trainable (the reference point of the trade-off table: best quality, most memory).

It refuses a quantized base (``quantizer.name`` other than ``none``): 4-bit codes cannot be
trained. ``save`` writes the trained weights as a safetensors file (``model.safetensors`` in the
adapter directory, with the names of the base model's state dict); ``load`` puts them back onto a
freshly loaded base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import attrs

from qlora_plugins import Adapter, AdapterContext, hookimpl
from qlora_plugins.errors import ConfigError
from qlora_plugins.planning import ActivationCoefficients, Architecture, LinearShape

#: Bytes a decoder layer saves for backward per token (``h * hidden + i * intermediate +
#: kv * kv_width + c``) without adapters' dropout, by compute dtype: the same measurement as the
#: lora adapter's table (docs/memory.md), whose adapters save the inputs the base layers save.
#: Full fine-tuning adds ``7 * dtype bytes`` per hidden unit (the weight gradients' inputs).
BASE_ACTIVATION_BYTES = {
    "float32": ActivationCoefficients(h=24.0, i=16.0, kv=8.0, c=300.0),
    "bfloat16": ActivationCoefficients(h=36.0, i=10.0, kv=4.0, c=265.0),
}


class FullFineTuning(Adapter):
    """Full fine-tuning: every floating-point weight of the unquantized model is trainable."""

    name = "full"
    needs_full_precision_base = True

    # --- planning (``qlora plan``) ------------------------------------------------------------

    def planned_trainable(self, layers: Sequence[LinearShape], arch: Architecture) -> int:
        """Every parameter of the model."""
        return arch.total_params

    def planned_weight_bytes(self, trainable: int, dtype_bytes: int) -> tuple[float, float]:
        """The trained weights are the base weights (nothing added); gradients in the model dtype."""
        return 0, trainable * dtype_bytes

    def planned_activations(self, compute_dtype: str, dtype_bytes: int) -> ActivationCoefficients:
        base = BASE_ACTIVATION_BYTES[compute_dtype]
        return attrs.evolve(base, h=base.h + 7 * dtype_bytes)

    def planned_label(self) -> str:
        return "trainable weights (full fine-tuning)"

    @staticmethod
    def _check(model: Any, context: AdapterContext) -> None:
        from qlora_plugins.quant_linear import QuantLinear

        if context.quantized or any(isinstance(m, QuantLinear) for m in model.modules()) or _has_bnb_4bit(model):
            raise ConfigError(
                "adapter.name",
                "full fine-tuning trains every weight and needs an unquantized base; "
                "set quantizer.name: none (or use adapter lora for QLoRA)",
            )

    def attach(self, model: Any, context: AdapterContext) -> Any:
        self._check(model, context)
        for param in model.parameters():
            param.requires_grad_(param.dtype.is_floating_point)
        return model

    def save(self, model: Any, directory: Path) -> None:
        from safetensors.torch import save_file

        # named_parameters() lists a tied (shared) weight once, which safetensors requires
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "adapter": "full"})

    def load(self, model: Any, directory: Path, context: AdapterContext) -> Any:
        from safetensors.torch import load_file

        self._check(model, context)
        state = load_file(str(directory / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError("adapter", f"{directory}: weights that the model does not have: {', '.join(unexpected[:5])}")
        return model


def _has_bnb_4bit(model: Any) -> bool:
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            return True
    return False


@hookimpl
def register_adapters(register):
    register(FullFineTuning)
