"""Builtin exporter ``merged_4bit``: merge the adapter into the quantized base and re-quantize.

Each adapted layer's effective weight as trained, ``T = dequantize(Q) + B @ A * scaling``, is
quantized again with the run's own format (so the block scales are re-derived from the merged
weights) and saved as a 4-bit checkpoint (:func:`qlora_plugins.exporting.save_model_checkpoint`): for
nf4/fp4 the transformers + bitsandbytes format that plain ``from_pretrained`` loads, for other
formats the documented qlora_plugins format.

Re-quantization rounds ``T`` to the 4-bit grid again, and an adapter update smaller than half a
quantization step is mostly rounded away. ``correction_rank: k`` keeps the rank-``k`` truncated
SVD of the residual ``T - dequantize(requantize(T))`` of every merged layer and ships it as a PEFT
LoRA adapter in ``correction/`` (attached by :func:`~qlora_plugins.exporting.load_model_checkpoint`,
or by ``peft.PeftModel.from_pretrained`` without this project). The residual is dominated by the
lost part of the low-rank update, so a rank near the adapter's recovers most of it. The exporter
reports the weight error and the logit fidelity with and without the correction.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import attrs

from qlora_plugins import ExportCheck, ExportContext, Exporter, hookimpl
from qlora_plugins.errors import ExportError
from qlora_plugins.exporting import (
    CORRECTION_ADAPTER_FILE,
    CORRECTION_DIR,
    ExportOptions,
    compare_logits,
    current_registry,
    dequantized_weight,
    finish_plain_model,
    is_quantized_layer,
    load_model_checkpoint,
    model_logits,
    original_layer_types,
    plain_layer,
    probe_batch,
    save_model_checkpoint,
    state_from_bnb,
)
from qlora_plugins.modeling import set_submodule
from qlora_plugins.options import in_range

#: Default tolerance: re-quantization changes the model by design; this catches a broken merge
#: or a format mismatch, not the small loss the recipe expects (tighten it per model).
TOLERANCE = {"max_kl": 0.02, "min_top1": 0.9}
#: Exact SVD below this size, randomized low-rank SVD above.
_EXACT_SVD_MAX_DIM = 2048
_SINGLE_THREAD_SVD_MAX_DIM = 512


@attrs.define
class Merged4bitOptions(ExportOptions):
    """``correction_rank``: rank of the low-rank correction of the re-quantization error
    (0: none), plus the options every verified exporter takes."""

    correction_rank: int = attrs.field(default=0, validator=in_range(0, 4096))


def low_rank(residual: Any, rank: int) -> tuple[Any, Any]:
    """``(A [k, in], B [out, k])`` with ``B @ A`` the best rank-``k`` approximation of
    ``residual`` (the singular values split evenly between the factors)."""
    import torch

    k = min(rank, *residual.shape)
    if min(residual.shape) <= _EXACT_SVD_MAX_DIM:
        threads = torch.get_num_threads()
        if residual.device.type == "cpu" and min(residual.shape) <= _SINGLE_THREAD_SVD_MAX_DIM:
            torch.set_num_threads(1)  # LAPACK's threads only contend on small matrices
        try:
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        finally:
            torch.set_num_threads(threads)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        u, s, v = torch.svd_lowrank(residual, q=min(k + 10, min(residual.shape)), niter=4)
        u, s, vh = u[:, :k], s[:k], v[:, :k].t()
    root = s.sqrt()
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def save_correction(directory: Path, factors: dict, task: str, base_name: str = "") -> dict:
    """Write low-rank corrections ``{layer: (A [k, in], B [out, k])}`` as a PEFT LoRA adapter
    (``lora_alpha == r``, so scaling is 1 and ``B @ A`` is added as is) into ``directory``, with
    ``qlora_adapter.json`` naming the ``lora`` adapter plugin that loads it back."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {name: a.shape[0] for name, (a, _b) in factors.items()}
    rank = max(ranks.values())
    pattern = {name: r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(factors),
        rank_pattern=pattern,
        alpha_pattern={name: r for name, r in pattern.items()},
        task_type={"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}.get(task),
        bias="none",
        base_model_name_or_path=base_name or None,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / CORRECTION_ADAPTER_FILE).write_text(json.dumps({"adapter": "lora"}) + "\n", encoding="utf-8")
    return {"rank": rank, "layers": len(factors)}


class _ErrorSums:
    """Squared Frobenius norms summed over merged layers."""

    def __init__(self) -> None:
        self.target = self.update = self.residual = self.corrected = 0.0
        self.layers = 0

    def figures(self, corrected: bool) -> dict:
        def ratio(a: float, b: float) -> float | None:
            return math.sqrt(a / b) if b > 0 else None

        out = {
            "layers": self.layers,
            "weight_rel_error": ratio(self.residual, self.target),
            "update_rel_error": ratio(self.residual, self.update),
        }
        if corrected:
            out["with_correction"] = {
                "weight_rel_error": ratio(self.corrected, self.target),
                "update_rel_error": ratio(self.corrected, self.update),
            }
        return out


class Merged4bitExporter(Exporter):
    """Adapter merged into the 4-bit base and re-quantized (bitsandbytes format for nf4/fp4)."""

    name = "merged_4bit"
    Options = Merged4bitOptions

    def default_tolerance(self) -> dict:
        return dict(TOLERANCE)

    def check(self, context: ExportCheck) -> None:
        """Refuse, before training, a run whose quantizer cannot re-quantize (no encode/decode)."""
        quantizer = context.quantizer
        if not callable(getattr(quantizer, "encode", None)) or not callable(getattr(quantizer, "decode", None)):
            raise ExportError(
                f"{context.config_path}: exporter 'merged_4bit' needs a blockwise 4-bit quantizer; the run uses "
                f"'{quantizer.name}' (use the 'merged' exporter for a full-precision model)"
            )

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        import torch

        quantizer = context.quantizer
        self.check(ExportCheck(context.task, quantizer, context.adapter, context.base_model_path))
        rank = self.options.correction_rank
        work = copy.deepcopy(context.model)
        sums, factors = _ErrorSums(), {}
        with torch.no_grad():
            targets = context.adapter.merge_targets(work)
            plain = context.adapter.unwrap(work)
            types = original_layer_types(plain)
            for merge in targets:
                base, name = merge.base_layer, merge.name
                if merge.delta is None:
                    continue
                target = dequantized_weight(base)
                target = target + merge.delta.to(target.device)
                if not is_quantized_layer(base):  # a layer the quantizer kept in full precision
                    set_submodule(plain, name, plain_layer(base, target, types.get(name)))
                    continue
                new = self._requantize(base, target, quantizer, name)
                residual = target - new.dequantize(torch.float32)
                sums.layers += 1
                sums.target += float(target.square().sum())
                sums.update += float(merge.delta.square().sum())
                sums.residual += float(residual.square().sum())
                if rank:
                    a, b = low_rank(residual, rank)
                    sums.corrected += float((residual - b @ a).square().sum())
                    factors[name] = (a, b)
                set_submodule(plain, name, new)
            for name, module in list(plain.named_modules()):
                if is_quantized_layer(module) and not hasattr(module, "quantizer"):
                    set_submodule(plain, name, self._from_bnb(module, quantizer, name))
        if sums.layers == 0:
            raise ExportError("exporter 'merged_4bit': the adapter changes no quantized layer, so there is nothing to merge")
        finish_plain_model(plain, context.base_model_path)
        info = save_model_checkpoint(plain, output_dir, quantizer, quantizer_source=self._source(quantizer))
        del plain, work
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(str(output_dir))
        info["requantization"] = sums.figures(bool(factors))
        if factors:
            info["correction"] = {
                **save_correction(output_dir / CORRECTION_DIR, factors, context.task),
                "bytes": sum(4 * (a.numel() + b.numel()) for a, b in factors.values()),
            }
            info["fidelity_without_correction"] = self._fidelity_without_correction(context, output_dir)
        return {"format": info.pop("checkpoint_format"), **info}

    @staticmethod
    def _requantize(base: Any, target: Any, quantizer: Any, name: str) -> Any:
        import torch

        from qlora_plugins.quant_linear import QuantLinear

        if isinstance(base, QuantLinear):
            compute, bias = base.compute_dtype, base.bias
        else:  # bitsandbytes Linear4bit (backend: bitsandbytes)
            compute = getattr(base, "compute_dtype", None) or torch.float32
            bias = base.bias
        state = quantizer.encode(target, name)
        bias_data = bias.detach().clone() if bias is not None else None
        return QuantLinear(target.shape[1], target.shape[0], quantizer, state, bias_data, compute, name)

    @staticmethod
    def _from_bnb(module: Any, quantizer: Any, name: str) -> Any:
        """A QuantLinear with exactly the codes of a bitsandbytes 4-bit layer (not re-quantized)."""
        import torch

        from qlora_plugins.quant_linear import QuantLinear

        state = state_from_bnb(module)
        bias = module.bias.detach().clone() if module.bias is not None else None
        compute = getattr(module, "compute_dtype", None) or torch.float32
        return QuantLinear(module.in_features, module.out_features, quantizer, state, bias, compute, name)

    @staticmethod
    def _source(quantizer: Any) -> dict:
        try:
            reg = current_registry().registration("quantizer", quantizer.name)
            return {"distribution": reg.source.distribution, "version": reg.source.version}
        except Exception:  # an unregistered quantizer instance still saves
            return {}

    def _fidelity_without_correction(self, context: ExportContext, output_dir: Path) -> dict:
        """Logit fidelity of the saved checkpoint loaded without its correction."""
        batch, _source = probe_batch(context, self.options.probe_text)
        model = load_model_checkpoint(
            output_dir, context.task, current_registry(), device=context.model_request.device, with_correction=False
        )
        candidate = model_logits(model, batch)
        del model
        return compare_logits(model_logits(context.model, batch), candidate, batch["attention_mask"])


@hookimpl
def register_exporters(register):
    register(Merged4bitExporter)
