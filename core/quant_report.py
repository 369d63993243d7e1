"""``qlora quant-report``: quantize one checkpoint with several schemes and compare them.

For each quantizer: bits per parameter, weight reconstruction error (MSE and SQNR over all
quantized layers, and the worst layers), and output fidelity against the full-precision model
(perplexity on a probe text for causal LMs; relative error and cosine similarity of the last
hidden states otherwise).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

import attrs

from qlora_plugins.core import modeling
from qlora_plugins.core.errors import ModelError, QloraError
from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, iter_linear_layers
from qlora_plugins.core.wording import option

DEFAULT_PROBE = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them."
)


def is_causal_lm(model_dir: Path) -> bool:
    """Whether the checkpoint's architecture is a causal LM (from config.json)."""
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _load(model_dir: Path, causal: bool, trust_remote_code: bool) -> Any:
    import torch
    import transformers

    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model, info = cls.from_pretrained(
            str(model_dir), dtype=torch.float32, local_files_only=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"MODEL_DIR: cannot load {model_dir}: {str(exc).splitlines()[0]}") from None
    modeling.check_loading_info(info, model_dir, type(model).__name__, new_head=not causal, config_path="MODEL_DIR")
    return model.eval()


def _windows(tokenizer: Any, text: str, seq_len: int, max_tokens: int) -> list:
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise QloraError(f"{option('text')}: the probe text has fewer than 2 tokens")
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids) - 1, seq_len) if len(ids[i : i + seq_len]) > 1]


def perplexity(model: Any, windows: list) -> float:
    """exp(mean token NLL) over the windows."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            nll += out.loss.item() * n
            count += n
    return math.exp(nll / count)


def hidden_states(model: Any, windows: list) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).last_hidden_state for ids in windows]


def weight_errors(quantizer: Any, model: Any) -> list[dict]:
    """Per-layer MSE and SQNR of encode/decode (blockwise quantizers only)."""
    import torch

    if not hasattr(quantizer, "encode"):
        return []
    rows = []
    for name, linear in iter_linear_layers(model, DEFAULT_SKIP_MODULES):
        w = linear.weight.data.float()
        back = quantizer.decode(quantizer.encode(w, name), tuple(w.shape), torch.float32)
        mse = float(((back - w) ** 2).mean())
        signal = float((w**2).mean())
        rows.append({"layer": name, "numel": w.numel(), "mse": mse, "sqnr_db": 10 * math.log10(signal / mse) if mse > 0 else float("inf")})
    return rows


def run_report(
    model_dir: Path,
    quantizer_names: Sequence[str],
    registry: Any,
    double_quant: bool,
    blocksize: int,
    text: str,
    seq_len: int = 256,
    max_tokens: int = 4096,
    worst: int = 3,
    trust_remote_code: bool = False,
    progress: Any = None,
    frozen_dtype: Any = None,
) -> dict:
    """Compare quantizers on one checkpoint; returns the report as a mapping. With
    ``frozen_dtype`` (a 16-bit torch dtype) every quantizer gets a second row, ``NAME+frozen-DTYPE``,
    measured with the unquantized frozen weights stored in that dtype (``model.frozen_dtype``)."""
    import torch

    modeling.check_model_dir(model_dir, "MODEL_DIR")
    for name in quantizer_names:
        registry.get("quantizer", name, option("quantizers"))
    causal = is_causal_lm(model_dir)
    tokenizer = modeling.load_tokenizer(model_dir, trust_remote_code)
    torch.manual_seed(0)
    reference = _load(model_dir, causal, trust_remote_code)
    max_pos = getattr(reference.config, "max_position_embeddings", None) or seq_len
    windows = _windows(tokenizer, text, min(seq_len, max_pos), max_tokens)
    base: dict[str, Any] = {
        "model": str(model_dir),
        "kind": "causal_lm" if causal else "encoder",
        "probe_tokens": sum(w.shape[1] for w in windows),
        "blocksize": blocksize,
        "double_quant": double_quant,
    }
    if causal:
        base["fp_perplexity"] = perplexity(reference, windows)
    else:
        ref_hidden = hidden_states(reference, windows)
    rows = []
    for name in quantizer_names:
        fields = {f.alias or f.name for f in attrs.fields(registry.get("quantizer", name).Options) if f.init}
        options = {k: v for k, v in (("blocksize", blocksize), ("double_quant", double_quant)) if k in fields}
        quantizer = registry.create("quantizer", name, options, "quantizer")
        layers = weight_errors(quantizer, reference)
        model = copy.deepcopy(reference)
        quantizer.quantize_model(model, list(DEFAULT_SKIP_MODULES))
        fp = quantizer.footprint(model)
        row: dict[str, Any] = {"quantizer": name, "bits_per_param": fp.bits_per_param, "quantized_params": fp.quantized_params}
        if layers:
            total = sum(r["numel"] for r in layers)
            mse = sum(r["mse"] * r["numel"] for r in layers) / total
            signal = (
                sum(float((lin.weight.data.float() ** 2).sum()) for _, lin in iter_linear_layers(reference, DEFAULT_SKIP_MODULES)) / total
            )
            row.update(
                {
                    "weight_mse": mse,
                    "weight_sqnr_db": 10 * math.log10(signal / mse) if mse > 0 else float("inf"),
                    "worst_layers": sorted(layers, key=lambda r: r["sqnr_db"])[:worst],
                }
            )
        variants = [(row, None)]
        if frozen_dtype is not None:
            variants.append(({**row, "quantizer": f"{name}+frozen-{str(frozen_dtype).replace('torch.', '')}"}, frozen_dtype))
        for out_row, dtype in variants:
            if dtype is not None:
                from qlora_plugins.core.frozen import keep_frozen_16bit

                for param in model.parameters():
                    param.requires_grad_(False)
                keep_frozen_16bit(model, dtype, torch.float32)
            if causal:
                ppl = perplexity(model, windows)
                out_row.update({"perplexity": ppl, "perplexity_ratio": ppl / base["fp_perplexity"]})
            else:
                hidden = hidden_states(model, windows)
                num = sum(float(((h - r) ** 2).sum()) for h, r in zip(hidden, ref_hidden))
                den = sum(float((r**2).sum()) for r in ref_hidden)
                cos = [float(torch.nn.functional.cosine_similarity(h.flatten(), r.flatten(), dim=0)) for h, r in zip(hidden, ref_hidden)]
                out_row.update({"hidden_relative_error": math.sqrt(num / den), "hidden_cosine": sum(cos) / len(cos)})
            rows.append(out_row)
        del model
        if progress is not None:
            progress(name)
    base["results"] = rows
    return base


def format_report(report: dict) -> str:
    """The side-by-side table."""
    causal = report["kind"] == "causal_lm"
    headers = ["quantizer", "bits/param", "weight MSE", "SQNR dB", "worst layer (SQNR dB)"]
    headers += ["perplexity", "x fp"] if causal else ["hidden rel err", "cosine"]
    lines = []
    for r in report["results"]:
        worst = r.get("worst_layers") or []
        cells = [
            r["quantizer"],
            "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}",
            f"{r['weight_mse']:.3e}" if "weight_mse" in r else "-",
            f"{r['weight_sqnr_db']:.2f}" if "weight_sqnr_db" in r else "-",
            f"{worst[0]['layer']} ({worst[0]['sqnr_db']:.2f})" if worst else "-",
        ]
        if causal:
            cells += [f"{r['perplexity']:.3f}", f"{r['perplexity_ratio']:.4f}"]
        else:
            cells += [f"{r['hidden_relative_error']:.4f}", f"{r['hidden_cosine']:.5f}"]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines)]
    out = [
        f"{report['model']} ({report['kind']}, blocksize {report['blocksize']}, double quant {report['double_quant']}, {report['probe_tokens']} probe tokens)"
    ]
    if causal:
        out.append(f"full-precision perplexity: {report['fp_perplexity']:.3f}")
    out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)
