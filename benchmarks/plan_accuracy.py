"""Benchmark: how close ``qlora plan`` comes to measured memory on this machine, printed as ONE JSON
object.

Llama-architecture models from ~11M to ~380M parameters (random init, written once as fp32
safetensors checkpoints into ``--cache``) are trained for 2 optimizer steps in a fresh process per
configuration (``benchmarks/memory.py``'s worker: our nf4 + DQ QLoRA or the fp32 LoRA baseline,
LoRA r=16 on every linear layer, dropout 0.05, torch AdamW, gradient checkpointing on or off,
several batch shapes). Measured = peak RSS minus the import baseline, the baseline measured the
same way (a fresh process doing the same imports and nothing else). Predicted = the planner's
host peak over the baseline for the same settings on ``--device cpu``.

Calibration (``--calibrate``): the two CPU constants of the planner that cannot be derived from
first principles -- ``fixed`` (bytes a training process adds whatever the model) and
``transient`` (multiplier on the training pass's dynamic memory: stored activations plus the
transients -- logits and their gradients, one recomputed layer, the dequantization workspace --
covering the allocator's fragmentation and short-lived gradients) -- are fitted by least squares on the
configurations with an even index and checked on the odd ones (held out). Everything else in the
planner (weights, constants, adapters, optimizer states, stored activations) is computed, not
fitted. The fitted values are printed; core/planner.py's ``CPU`` holds the ones last adopted.

Usage: ``python benchmarks/plan_accuracy.py [--calibrate] [--only 11m,34m]``  (~30-40 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory import ARCHS as MEMORY_ARCHS  # noqa: E402
from memory import run_worker, versions, write_llama_checkpoint  # noqa: E402

#: ~11M to ~380M parameters; the 336M one is the memory benchmark's model.
ARCHS: dict[str, dict] = {
    "11m": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=16000,
        tie_word_embeddings=False,
    ),
    "35m": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=16000,
        tie_word_embeddings=False,
    ),
    "75m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
    "184m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=10,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "336m": MEMORY_ARCHS["336m"],
    "381m": dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}

#: (model, mode, batch, seq). Modes as in memory.py: qlora (nf4+DQ, fp32), qlora_bf16 (model dtype
#: bf16), lora (fp32 baseline); a ``_nogc`` suffix turns gradient checkpointing off.
CONFIGS: list[tuple[str, str, int, int]] = [
    ("11m", "qlora", 1, 128),
    ("11m", "lora", 1, 128),
    ("11m", "qlora_nogc", 4, 256),
    ("35m", "qlora", 4, 256),
    ("35m", "lora", 1, 128),
    ("35m", "qlora_nogc", 4, 256),
    ("75m", "qlora", 1, 128),
    ("75m", "lora", 2, 128),
    ("75m", "qlora_nogc", 2, 256),
    ("75m", "qlora_bf16", 2, 256),
    ("184m", "qlora", 1, 128),
    ("184m", "lora", 1, 128),
    ("184m", "qlora", 4, 256),
    ("336m", "qlora", 1, 128),
    ("336m", "lora", 1, 128),
    ("336m", "qlora_bf16", 1, 128),
    ("336m", "qlora_nogc", 2, 256),
    ("381m", "qlora", 1, 128),
    ("381m", "lora", 1, 128),
    ("381m", "qlora", 2, 256),
]


def settings_for(mode: str, batch: int, seq: int):
    from qlora_plugins.core.planner import Settings
    from qlora_plugins.core.registry import create_registry

    lora = mode.startswith("lora")
    return Settings.from_names(
        create_registry(load_entrypoints=False),
        quantizer="none" if lora else "nf4",
        quantizer_options={} if lora else {"double_quant": True, "blocksize": 64},
        adapter="lora",
        adapter_options={"r": 16, "dropout": 0.05},
        optimizer="adamw",
        dtype="bfloat16" if "bf16" in mode else "float32",
        batch=batch,
        seq=seq,
        gradient_checkpointing=not mode.endswith("_nogc"),
        device="cpu",
    )


def predict(path: Path, mode: str, batch: int, seq: int, constants: dict | None = None) -> dict:
    """The planner's prediction over the baseline, and its parts for the calibration."""
    from qlora_plugins.core import planner

    arch = planner.load_architecture(str(path))
    settings = settings_for(mode, batch, seq)
    plan = planner.make_plan(arch, settings, constants)
    rows = {r.key: r.host for r in plan.rows}
    # the two fitted terms: the multiplier applies to activations + transients, fixed is added
    dynamic = rows["activations"] + rows["transient"]
    static = sum(v for k, v in rows.items() if k not in ("activations", "transient", "runtime"))
    return {
        "over_baseline": plan.totals["host_over_baseline_bytes"],
        "load": plan.totals["load_peak_over_baseline_bytes"],
        "static": static,
        "dynamic": dynamic,
    }


def fit(samples: list[dict]) -> tuple[float, float]:
    """Weighted least squares for ``measured - static = transient * dynamic + fixed``
    (``transient`` >= 1, ``fixed`` >= 0), ``dynamic`` being stored activations plus transient
    buffers, each sample weighted by 1 / measured^2: the target is a relative error (+-15%), so
    a 100 MB model's 20 MB miss counts as much as a 1 GB model's 200 MB."""
    xs = [s["pred"]["dynamic"] for s in samples]
    ys = [s["measured_over_baseline"] - s["pred"]["static"] for s in samples]
    ws = [1.0 / s["measured_over_baseline"] ** 2 for s in samples]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    var = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / var if var else 1.0
    slope = max(slope, 1.0)  # transient memory is at least what the model says
    fixed = max(0.0, my - slope * mx)
    return slope, fixed


def measure(configs: list, args: argparse.Namespace, log) -> tuple[float, list[dict]]:
    """Run every configuration in a fresh process; the import baseline and the samples."""
    baselines = []
    for _ in range(args.baselines):
        baselines.append(run_worker({"mode": "baseline"})["peak"])
    baseline = statistics.median(baselines)
    log(f"import baseline {baseline / 2**20:.0f} MiB")
    samples = []
    for model, mode, batch, seq in configs:
        path = write_llama_checkpoint(args.cache / f"llama-{model}", ARCHS[model], log=log)
        log(f"{model} {mode} {batch}x{seq}")
        res = run_worker({"mode": mode, "path": str(path), "batch": batch, "seq": seq, "steps": args.steps})
        if "error" in res:
            log(f"  failed: {res['error']}")
            samples.append({"model": model, "mode": mode, "batch": batch, "seq": seq, "error": res["error"]})
            continue
        samples.append(
            {
                "model": model,
                "mode": mode,
                "batch": batch,
                "seq": seq,
                "path": str(path),
                "measured_over_baseline": res["peak"] - baseline,
                "load_over_baseline": res["load_peak"] - baseline,
                "pred": predict(path, mode, batch, seq),
            }
        )
    return baseline, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("QLORA_BENCH_CACHE", "/tmp/qlora-bench")))
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--calibrate", action="store_true", help="fit the CPU constants (even configs) and report held-out errors")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--baselines", type=int, default=3, help="import-baseline processes (median)")
    parser.add_argument(
        "--measurements", type=Path, help="reuse the measured figures of an earlier run's JSON output (re-predict and re-fit only)"
    )
    args = parser.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    only = set(args.only.split(",")) if args.only else None
    configs = [c for c in CONFIGS if only is None or c[0] in only]

    if args.measurements:
        earlier = json.loads(args.measurements.read_text())
        baseline = earlier["calibration"]["baseline_measured"] if earlier.get("calibration") else earlier["import_baseline_mb"] * 2**20
        samples = []
        for row in earlier["configs"]:
            if "measured_mb" not in row or (only and row["model"] not in only):
                continue
            path = args.cache / f"llama-{row['model']}"
            samples.append(
                {
                    **{k: row[k] for k in ("model", "mode", "batch", "seq")},
                    "path": str(path),
                    "measured_over_baseline": row["measured_mb"] * 2**20,
                    "load_over_baseline": row["load_measured_mb"] * 2**20,
                    "pred": predict(path, row["mode"], row["batch"], row["seq"]),
                }
            )
    else:
        baseline, samples = measure(configs, args, log)
    good = [s for s in samples if "error" not in s]

    from qlora_plugins.core import planner

    calibration = None
    constants = None
    if args.calibrate and len(good) >= 4:
        train = [s for i, s in enumerate(good) if i % 2 == 0 and s["measured_over_baseline"] > s["pred"]["load"]]
        slope, fixed = fit(train or good[::2])
        constants = {"transient": round(slope, 2), "fixed": round(fixed / 1e6) * 1e6}
        calibration = {
            "fitted_on": [f"{s['model']} {s['mode']} {s['batch']}x{s['seq']}" for s in train],
            "fitted": constants,
            "planner_now": {k: planner.CPU[k] for k in constants},
            "baseline_measured": baseline,
        }

    rows, errors, held_out = [], [], []
    for i, s in enumerate(samples):
        if "error" in s:
            rows.append(s)
            continue
        prediction = predict(Path(s["path"]), s["mode"], s["batch"], s["seq"], constants)
        pred = prediction["over_baseline"]
        err = pred / s["measured_over_baseline"] - 1
        errors.append(abs(err))
        if constants is not None and i % 2 == 1:
            held_out.append(abs(err))
        rows.append(
            {
                "model": s["model"],
                "mode": s["mode"],
                "batch": s["batch"],
                "seq": s["seq"],
                "measured_mb": round(s["measured_over_baseline"] / 2**20, 1),
                "predicted_mb": round(pred / 2**20, 1),
                "error": round(err, 3),
                "load_measured_mb": round(s["load_over_baseline"] / 2**20, 1),
                "load_predicted_mb": round(prediction["load"] / 2**20, 1),
                "load_error": round(prediction["load"] / s["load_over_baseline"] - 1, 3) if s["mode"].startswith("qlora") else None,
            }
        )
    report = {
        "benchmark": "plan_accuracy",
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "machine": {"cpus": os.cpu_count()},
        "import_baseline_mb": round(baseline / 2**20, 1),
        "planner_constants": constants or {k: planner.CPU[k] for k in ("fixed", "transient")},
        "calibration": calibration,
        "measurements_from": str(args.measurements) if args.measurements else "this run",
        "configs": rows,
        "max_abs_error": round(max(errors), 3) if errors else None,
        "median_abs_error": round(statistics.median(errors), 3) if errors else None,
        "within_15_percent": f"{sum(e <= 0.15 for e in errors)}/{len(errors)}",
        "held_out_max_abs_error": round(max(held_out), 3) if held_out else None,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
