"""The quantized-weight contract shared by every blockwise format, and the layer that uses it.

- :class:`BlockwiseQuantizer` is the base class of the builtin formats (nf4, fp4, int4_sym,
  int4_asym) and of third-party ones: a format implements ``encode_blocks`` / ``decode_blocks``
  (weight <-> a dict of tensors) and inherits model quantization, double quantization of the
  per-block constants, footprints, dequantization and checkpoint save/load.
- :class:`ScaleQuantizer` compresses the fp32 per-block constants (double quantization); the
  builtin :class:`DynamicScaleQuantizer` is bitsandbytes' 8-bit dynamic map over blocks of 256.
- :class:`~qlora_plugins.core.quant_linear.QuantLinear` (in its own module, which imports torch)
  stores the packed state as buffers and dequantizes on the fly.

torch is imported inside methods so that registering these plugins (``qlora plugins``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

import attrs

from qlora_plugins.core.errors import QuantizationError
from qlora_plugins.core.interfaces import Footprint, Quantizer
from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, set_submodule, torch_dtype
from qlora_plugins.core.options import power_of_two

if TYPE_CHECKING:  # pragma: no cover
    import torch


@attrs.define
class BlockwiseOptions:
    """Options of every blockwise 4-bit format."""

    blocksize: int = attrs.field(default=64, validator=power_of_two(32, 4096))
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    skip_modules: list[str] = attrs.field(factory=list)


class ScaleQuantizer:
    """Compresses a 1-D fp32 tensor of per-block constants (double quantization)."""

    name: ClassVar[str] = ""

    def encode(self, values: "torch.Tensor") -> dict:
        """Return tensors (keys without prefix) that :meth:`decode` turns back into ``values``."""
        raise NotImplementedError

    def decode(self, state: dict) -> "torch.Tensor":
        """Reconstruct the fp32 constants from :meth:`encode`'s tensors."""
        raise NotImplementedError

    def planned_bytes(self, count: int) -> int:
        """Bytes :meth:`encode` stores for ``count`` fp32 constants (the memory planner's
        figure). The default raises ``NotImplementedError``: the planner refuses the format with
        double quantization on."""
        raise NotImplementedError(f"scale quantizer {self.name!r} does not declare planned_bytes")


class DynamicScaleQuantizer(ScaleQuantizer):
    """bitsandbytes-compatible double quantization: subtract the mean, then 8-bit blockwise
    (blocks of 256) with the signed dynamic map. 32 bits per block become 8 (+32 per 256 blocks)."""

    name = "dynamic8"
    blocksize = 256

    def encode(self, values):
        import torch

        from qlora_plugins.core import kernels

        codes, absmax2, offset, _code = kernels.double_quantize(values)
        return {"q": codes, "absmax": absmax2, "offset": torch.tensor([float(offset)], dtype=torch.float32, device=values.device)}

    def decode(self, state):
        from qlora_plugins.core import kernels

        return kernels.double_dequantize(state["q"], state["absmax"], float(state["offset"].item()))

    def planned_bytes(self, count: int) -> int:
        """One uint8 code per constant, an fp32 absmax per 256 of them and one fp32 offset."""
        return count + 4 * -(-count // self.blocksize) + 4


class BlockwiseQuantizer(Quantizer):
    """Base class of blockwise 4-bit formats.

    A subclass sets ``name`` and implements :meth:`encode_blocks` and :meth:`decode_blocks`. Keys of
    the state listed in ``scale_keys`` are fp32 per-block constants that double quantization
    compresses. Everything else (replacing ``nn.Linear`` layers, LoRA support through peft, merge,
    footprints, save/load) comes from this class.
    """

    Options: ClassVar[type] = BlockwiseOptions
    scale_keys: ClassVar[tuple[str, ...]] = ("absmax",)
    scale_quantizer: ClassVar[ScaleQuantizer] = DynamicScaleQuantizer()

    # --- the format -------------------------------------------------------------------------

    def encode_blocks(self, weight: "torch.Tensor", blocksize: int) -> dict:
        """Quantize a flattened weight (fp32/bf16/fp16) into named tensors."""
        raise NotImplementedError

    def decode_blocks(self, state: dict, numel: int, blocksize: int, dtype: "torch.dtype") -> "torch.Tensor":
        """Dequantize named tensors back into a flat tensor of ``numel`` elements in ``dtype``."""
        raise NotImplementedError

    def decode_block_range(
        self, state: dict, first: int, stop: int, numel: int, blocksize: int, dtype: "torch.dtype", out: "torch.Tensor | None" = None
    ) -> "torch.Tensor":
        """Optional: dequantize only blocks ``[first, stop)`` of the flat weight (``numel`` elements
        in all; the last block may be partial) into a flat tensor of ``min(stop*blocksize, numel) -
        first*blocksize`` elements, written into ``out`` when given. ``state`` has its scales
        already decoded (as :meth:`decode_blocks` receives it). A format that implements it gets
        QuantLinear's tiled products on CPU (the whole weight is then never decoded at once);
        without it the layer decodes the whole weight for each product."""
        raise NotImplementedError

    def lut_form(self, state: dict) -> dict:
        """Optional: for a format whose dequantization is ``code[q] * absmax[b] (+ offset[b])`` with
        bitsandbytes' nibble packing, the tensors of that form: ``{"packed": uint8, "absmax": fp32,
        "code": 16 values, "offset": fp32 or absent}`` from a state with decoded scales. Such a
        format gets the fused C tile kernels on CPU and the Triton kernels on CUDA."""
        raise NotImplementedError

    # --- provided ---------------------------------------------------------------------------

    def encode(self, weight: "torch.Tensor", layer_name: str = "weight") -> dict:
        """Quantize ``weight`` (any shape) into a state dict, double-quantizing scales if enabled.

        :raises QuantizationError: naming ``layer_name`` for empty, non-finite or unsupported input.
        """
        import torch

        if weight.numel() == 0:
            raise QuantizationError(f"layer {layer_name}: cannot quantize an empty weight")
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizationError(f"layer {layer_name}: unsupported dtype {weight.dtype} (expected float32, bfloat16 or float16)")
        # in chunks: torch.isfinite of a whole layer allocates temporaries of several times its size
        if not all(bool(torch.isfinite(chunk).all()) for chunk in weight.reshape(-1).split(1 << 20)):
            raise QuantizationError(f"layer {layer_name}: weight contains NaN or Inf")
        state = dict(self.encode_blocks(weight.reshape(-1), self.options.blocksize))
        if self.options.double_quant:
            for key in self.scale_keys:
                if key in state:
                    values = state.pop(key)
                    for sub, tensor in self.scale_quantizer.encode(values.float()).items():
                        state[f"{key}_dq_{sub}"] = tensor
        return state

    def decoded_scales(self, state: dict) -> dict:
        """``state`` with its double-quantized per-block constants decoded (the first step of
        :meth:`decode`; the tiled products start from it too)."""
        flat = dict(state)
        for key in self.scale_keys:
            prefix = f"{key}_dq_"
            sub = {k[len(prefix) :]: flat.pop(k) for k in list(flat) if k.startswith(prefix)}
            if sub:
                flat[key] = self.scale_quantizer.decode(sub)
        return flat

    def decode(self, state: dict, shape: Sequence[int], dtype: "torch.dtype") -> "torch.Tensor":
        """Dequantize a state from :meth:`encode` into a tensor of ``shape`` and ``dtype``."""
        flat = self.decoded_scales(state)
        numel = 1
        for d in shape:
            numel *= d
        return self.decode_blocks(flat, numel, self.options.blocksize, dtype).reshape(tuple(shape))

    def compute_dtype_for(self, weight_dtype: "torch.dtype") -> "torch.dtype":
        return weight_dtype if self.options.compute_dtype == "auto" else torch_dtype(self.options.compute_dtype)

    def load_model(self, request: Any) -> Any:
        """Quantize while loading (:mod:`qlora_plugins.core.streaming`): the full-precision model is
        never materialized. Falls back to loading first when the checkpoint cannot be streamed."""
        from qlora_plugins.core.quant_linear import QuantLinear
        from qlora_plugins.core.streaming import StreamingUnsupported, stream_load

        def make(name: str, module: Any, weight: Any) -> Any:
            bias = module.bias.data if module.bias is not None else None
            state = self.encode(weight, name)
            return QuantLinear(weight.shape[1], weight.shape[0], self, state, bias, self.compute_dtype_for(weight.dtype), name)

        try:
            model = stream_load(request, make, [*request.skip_modules, *self.options.skip_modules])
            self.load_path = "streamed"
        except StreamingUnsupported as exc:
            self.load_path = f"from_pretrained ({exc})"
            model = request.load_full_precision()
            self.quantize_model(model, request.skip_modules)
        return model

    def quantize_model(self, model: Any, skip_modules: Sequence[str]) -> None:
        import torch

        from qlora_plugins.core.quant_linear import QuantLinear
        from qlora_plugins.core.streaming import linear_like_layers

        skip = [*skip_modules, *DEFAULT_SKIP_MODULES, *self.options.skip_modules]
        for name, module in linear_like_layers(model, skip).items():
            weight = module.weight.data if isinstance(module, torch.nn.Linear) else module.weight.data.t().contiguous()
            bias = module.bias.data if module.bias is not None else None
            state = self.encode(weight, name)
            set_submodule(
                model, name, QuantLinear(weight.shape[1], weight.shape[0], self, state, bias, self.compute_dtype_for(weight.dtype), name)
            )
            del module, weight  # the full-precision weight is released before the next layer

    def dequantize_model(self, model: Any) -> None:
        """Replace every QuantLinear by an ``nn.Linear`` with the dequantized weight."""
        from qlora_plugins.core.quant_linear import QuantLinear

        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                set_submodule(model, name, module.to_linear())

    def footprint(self, model: Any) -> Footprint:
        from qlora_plugins.core.quant_linear import QuantLinear

        params = nbytes = 0
        for module in model.modules():
            if isinstance(module, QuantLinear) and module.quantizer is self:
                params += module.in_features * module.out_features
                nbytes += sum(t.numel() * t.element_size() for t in module.state().values())
        return Footprint(params, nbytes)

    # --- planning (``qlora plan``) ----------------------------------------------------------

    #: Bytes per parameter that ``encode`` allocates on top of its input while quantizing one
    #: weight (the codes included), by model-dtype bytes: measured with VmHWM on 11.5M- and
    #: 70.8M-parameter weights with the project's kernels, the same for every builtin format.
    encode_bytes_per_param: ClassVar[dict[int, float]] = {4: 7.0, 2: 5.0}

    def planned_bytes(self, numel: int) -> tuple[int, int]:
        """Two 4-bit codes a byte; per block one fp32 constant per scale key, or with double
        quantization what :attr:`scale_quantizer` stores for the blocks' constants."""
        keys = len(self.scale_keys)
        blocks = -(-numel // self.options.blocksize)
        if self.options.double_quant:
            constants = keys * self.scale_quantizer.planned_bytes(blocks)
        else:
            constants = keys * 4 * blocks
        return (numel + 1) // 2, constants

    def planned_encode_bytes(self, numel: int, dtype_bytes: int) -> float:
        per_param = self.encode_bytes_per_param
        return numel * per_param.get(dtype_bytes, max(per_param.values()))

    def planned_label(self) -> str:
        return f"{self.name}{' + DQ' if self.options.double_quant else ''}, blocksize {self.options.blocksize}"

    def planned_variants(self) -> Sequence[tuple[str, Quantizer]]:
        """Without and with double quantization, at this quantizer's blocksize."""
        return [(self.name + (" + DQ" if dq else ""), type(self)(attrs.evolve(self.options, double_quant=dq))) for dq in (False, True)]

    def metadata(self) -> dict:
        return {
            "format": self.name,
            "backend": "qlora_plugins",
            "load": getattr(self, "load_path", None),
            "blocksize": self.options.blocksize,
            "double_quant": self.options.double_quant,
        }
