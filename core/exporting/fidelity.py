"""Fidelity of an export: reload the artifact from disk and compare its logits with the trained
model's on a probe batch (max and mean absolute logit difference, KL divergence, top-1 agreement),
then check the exporter's tolerance."""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path
from typing import Any, Callable

from qlora_plugins.core.errors import ExportError, QloraError
from qlora_plugins.core.exporting.tolerance import _bounds, _fmt, effective_tolerance, violations
from qlora_plugins.core.interfaces import AdapterContext, ExportContext
from qlora_plugins.core.progress import current as current_progress
from qlora_plugins.core.wording import option

Log = Callable[[str], None]

PROBE_MAX_EXAMPLES = 8
PROBE_MAX_TOKENS = 128


def probe_batch(context: ExportContext, probe_text: str | None = None) -> tuple[dict, str]:
    """Input tensors for the fidelity check and where they came from: ``probe_text`` if given,
    else up to 8 held-out examples, else a built-in paragraph (each at most 128 tokens)."""
    import torch

    tokenizer = context.tokenizer
    if probe_text:
        sequences, source = _text_sequences(tokenizer, probe_text), "probe_text"
    elif context.probe_examples:
        sequences = [list(e["input_ids"])[:PROBE_MAX_TOKENS] for e in list(context.probe_examples)[:PROBE_MAX_EXAMPLES]]
        sequences, source = [s for s in sequences if s], "held-out examples"
    else:
        from qlora_plugins.core.quant_report import DEFAULT_PROBE

        sequences, source = _text_sequences(tokenizer, DEFAULT_PROBE), "built-in text"
    if not sequences:
        raise ExportError("the probe batch is empty (set the exporter's probe_text)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}, source


def _text_sequences(tokenizer: Any, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return [ids[i : i + PROBE_MAX_TOKENS] for i in range(0, min(len(ids), PROBE_MAX_TOKENS * PROBE_MAX_EXAMPLES), PROBE_MAX_TOKENS)]


def _device_of(model: Any) -> Any:
    import torch

    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def model_logits(model: Any, batch: dict) -> Any:
    """The model's logits on ``batch`` as float32 on the CPU."""
    import torch

    device = _device_of(model)
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().float().cpu()


def compare_logits(reference: Any, candidate: Any, attention_mask: Any) -> dict:
    """Fidelity figures of ``candidate`` logits against ``reference`` (same shape): over real
    token positions for ``[batch, seq, vocab]`` logits, over rows for ``[batch, classes]``.

    ``max_abs_diff`` / ``mean_abs_diff``: absolute logit differences; ``kl``: mean
    KL(reference || candidate) of the softmax distributions (nats), ``kl_max`` its largest value;
    ``top1``: fraction of positions whose arg-max agrees.
    """
    import torch

    if tuple(reference.shape) != tuple(candidate.shape):
        raise ExportError(f"the reloaded model's logits have shape {tuple(candidate.shape)}, the trained model's {tuple(reference.shape)}")
    if reference.dim() == 3:
        keep = attention_mask.bool()
        ref, new = reference[keep], candidate[keep]
    else:
        ref, new = reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    if not torch.isfinite(new).all():
        return {
            "max_abs_diff": math.inf,
            "mean_abs_diff": math.inf,
            "kl": math.inf,
            "kl_max": math.inf,
            "top1": 0.0,
            "positions": int(ref.shape[0]),
        }
    diff = (ref - new).abs()
    logp_ref = torch.log_softmax(ref.double(), dim=-1)
    logp_new = torch.log_softmax(new.double(), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp_new)).sum(-1).clamp_min(0.0)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((ref.argmax(-1) == new.argmax(-1)).double().mean()),
        "positions": int(ref.shape[0]),
    }


@contextlib.contextmanager
def reloaded_artifact(exporter: Any, directory: Path, context: ExportContext, registry: Any) -> Any:
    """A model loaded back from ``directory`` (None when the exporter wrote nothing loadable):
    :meth:`Exporter.reload`, which returns the model or a context manager yielding it (the
    default loads a checkpoint directory)."""
    result = exporter.reload(directory, context)
    if isinstance(result, contextlib.AbstractContextManager):
        with result as model:
            yield model
    else:
        yield result


def load_adapter_onto_base(context: ExportContext, directory: Path) -> Any:
    """Load the base model again through the run's quantizer and attach the adapter saved in
    ``directory`` through the run's adapter plugin (what ``peft.PeftModel.from_pretrained`` does
    for LoRA)."""
    base = context.quantizer.load_model(context.model_request)
    model = context.adapter.load(
        base, directory, AdapterContext(task=context.task, quantized=context.quantizer.footprint(base).quantized_params > 0)
    )
    return model.eval()


def measure_fidelity(exporter: Any, directory: Path, context: ExportContext, reference: "_Reference", registry: Any, log: Log) -> dict:
    """Reload the artifact in ``directory``, compare it with the trained model, add the
    exporter's own figures (``verify``) and check the tolerance.

    :raises ExportError: when a figure exceeds the tolerance or the artifact does not load.
    """
    options = exporter.options
    tolerance = effective_tolerance(exporter)
    if not getattr(options, "verify", True):
        log(f"  fidelity check of '{exporter.name}' skipped (verify: false)")
        return {"status": "skipped", "tolerance": tolerance}
    result: dict[str, Any] = {}
    probe_text = getattr(options, "probe_text", None)
    batch, source = reference.batch(probe_text)
    expected = reference.logits(probe_text)  # before reloading: an adapter may be swapped into the trained model
    candidate = None
    try:
        with current_progress().stage(f"fidelity {exporter.name}"), reloaded_artifact(exporter, directory, context, registry) as model:
            if model is not None:
                candidate = model_logits(model, batch)
            del model
    except QloraError as exc:
        raise ExportError(f"export '{exporter.name}': the artifact does not load back: {exc}") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"export '{exporter.name}': the artifact does not load back: {type(exc).__name__}: {first}") from exc
    finally:
        gc.collect()
    if candidate is not None:
        result.update(compare_logits(expected, candidate, batch["attention_mask"]))
        result["probe"] = {"source": source, "sequences": int(batch["input_ids"].shape[0])}
    result.update(exporter.verify(directory, context) or {})
    if not result:
        log(f"  '{exporter.name}' offers no way to reload its artifact: fidelity not measured")
        return {"status": "not_measured", "tolerance": tolerance}
    bad = violations(result, tolerance, _bounds(exporter))
    result["tolerance"] = tolerance
    result["status"] = "failed" if bad else "passed"
    log("  fidelity: " + _summary(result))
    if bad:
        raise ExportError(
            f"export '{exporter.name}' failed its fidelity check ({'; '.join(bad)}); nothing was written. "
            f"Loosen it with the exporter option tolerance (e.g. {option('option')} tolerance.{bad[0].split()[3]}=...)"
        )
    return result


def _summary(figures: dict) -> str:
    parts = []
    for key, label in (("kl", "KL"), ("top1", "top-1"), ("max_abs_diff", "max |dlogit|"), ("mean_abs_diff", "mean |dlogit|")):
        if key in figures:
            parts.append(f"{label} {_fmt(figures[key])}")
    extra = [
        k
        for k in figures
        if k not in ("kl", "kl_max", "top1", "max_abs_diff", "mean_abs_diff", "positions", "probe", "tolerance", "status")
    ]
    parts += [f"{k} {_fmt(figures[k])}" for k in extra if isinstance(figures[k], (int, float))]
    return ", ".join(parts)


class _Reference:
    """The trained model's probe batch and logits, computed once per probe text."""

    def __init__(self, context: ExportContext) -> None:
        self.context = context
        self._cache: dict = {}

    def batch(self, probe_text: str | None) -> tuple[dict, str]:
        if probe_text not in self._cache:
            batch, source = probe_batch(self.context, probe_text)
            self._cache[probe_text] = (batch, source, None)
        batch, source, _ = self._cache[probe_text]
        return batch, source

    def logits(self, probe_text: str | None) -> Any:
        batch, source, logits = self._cache[probe_text]
        if logits is None:
            logits = model_logits(self.context.model, batch)
            self._cache[probe_text] = (batch, source, logits)
        return logits
