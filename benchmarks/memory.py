"""Benchmark: memory and step time of plain fp32 LoRA, our QLoRA and the anchor QLoRA stack,
printed as ONE JSON object.

Every configuration runs in a fresh process (``--worker``), on the same Llama-architecture
checkpoint (random init written as safetensors, fp32), the same random token batch, the same LoRA
settings (all-linear, r=16, alpha=32, dropout 0.05) and torch's AdamW:

* ``lora``: quantizer ``none`` (transformers ``from_pretrained`` in fp32) + our ``lora`` adapter,
  with the malloc setting every ``qlora run`` applies (``streaming.limit_heap_fragmentation``);
  ``lora_plain``: the same with glibc's default malloc settings, i.e. plain transformers + peft
  fp32 LoRA as its users run it (the issue's "plain fp32 LoRA");
* ``qlora``: our ``nf4`` quantizer (double quantization, blocksize 64, quantize-while-loading) +
  ``lora``; model dtype and compute dtype fp32 (same numerics as the baseline; the layers' products
  by fused tiles), and ``qlora_bf16`` with ``model.dtype: bfloat16`` (embeddings, norms and the
  dequantized compute in bf16, adapters fp32: the QLoRA paper's recipe); ``qlora_frozen16``: fp32
  compute with ``model.frozen_dtype: bfloat16`` (embeddings and head stored in bf16);
  ``qlora_whole``: ``qlora`` with ``QLORA_PLUGINS_MATMUL=whole`` (each product decodes the whole
  weight into a workspace: the path before the tiles);
* ``anchor``: transformers ``from_pretrained(quantization_config=BitsAndBytesConfig(4-bit nf4, double
  quant, fp32 compute))`` + peft ``prepare_model_for_kbit_training`` + ``get_peft_model``;
* ``baseline``: the same imports and nothing else (the import baseline).

Gradient checkpointing is on for every configuration (as in the default pipeline) unless the
name ends in ``_nogc``. Memory: a fresh-process worker reports the peak RSS (``VmHWM``) after
the imports, after loading and at the end, and the load time (``--repeats`` rounds of all
configurations, medians). Step time: because this machine is shared and its load swings by
several times within minutes, all configurations are also loaded into ONE process and stepped
interleaved (A B C A B C ..., ``--timing-rounds`` rounds); the step-time ratio is the median over
rounds of the ratio of neighbouring steps (wall and process CPU time), after ``--warmup`` rounds.

A second part (``--gc-batch 8 --gc-seq 256``) runs our QLoRA with gradient checkpointing on and
off at a larger batch and reports the peak memory the step adds over the set-up model
(activations + gradients + optimizer states, which are the same in both).

Usage::

    python benchmarks/memory.py                      # 336M model and a 2x model (~20 minutes on 2 cores)
    python benchmarks/memory.py --models 336m --timing-rounds 4 --no-gc-comparison
    python benchmarks/memory.py --worker '{"mode": "qlora", ...}'   # one configuration (internal)

Checkpoints are written once into ``--cache`` (default ``/tmp/qlora-bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Llama architectures used by the benchmarks. ``336m`` is the issue's model: hidden 2048,
#: 6 layers, intermediate 5632, 16 heads with 4 key/value heads, vocab 32000, tied embeddings
#: (336.1M parameters). ``697m`` is the same with 14 layers (2.07x the parameters).
ARCHS: dict[str, dict] = {
    "336m": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
    "697m": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=14,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
}

LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


# --------------------------------------------------------------------------------------------
# checkpoints


def write_llama_checkpoint(
    directory: Path,
    arch: dict,
    dtype: str = "float32",
    seed: int = 0,
    shard_bytes: int = 2 << 30,
    tile: int | None = None,
    log=lambda m: None,
) -> Path:
    """Write a random-init Llama checkpoint (config, sharded safetensors, byte-level tokenizer)
    tensor by tensor, never holding the whole model. Idempotent: an existing complete directory
    is reused (``.complete`` marker).

    :param tile: if given, weights are a random tile of ``tile`` values (N(0, 0.02)) repeated, with
        a per-tensor random scale in [0.5, 1.5] and a per-tensor offset into the tile (cheap for
        multi-billion-parameter checkpoints); otherwise every value is drawn independently.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_plugins.builtin_plugins.model_sources import byte_level_tokenizer

    directory = Path(directory)
    if (directory / ".complete").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer()
    config = LlamaConfig(
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch
    )
    config.dtype = dtype
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = [(n, tuple(p.shape)) for n, p in skeleton.state_dict().items()]
    if config.tie_word_embeddings:
        shapes = [(n, s) for n, s in shapes if n != "lm_head.weight"]
    del skeleton
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(tile, generator=gen) * 0.02).to(torch_dtype) if tile else None
    shards: list[dict] = [{}]
    sizes = [0]
    weight_map: dict[str, str] = {}
    total = 0

    def flush(final: bool) -> None:
        index = len(shards)
        name = f"model-{index:05d}.safetensors"
        save_file(shards[-1], str(directory / name), metadata={"format": "pt"})
        for key in shards[-1]:
            weight_map[key] = name
        log(f"wrote {name} ({sizes[-1] / 2**30:.2f} GiB)")
        shards[-1] = {}
        if not final:
            shards.append({})
            sizes.append(0)

    for name, shape in shapes:
        numel = 1
        for d in shape:
            numel *= d
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch_dtype)
        elif base is not None:
            start = int(torch.randint(0, tile, (1,), generator=gen))
            scale = 0.5 + float(torch.rand(1, generator=gen))
            reps = -(-(numel + start) // tile)
            tensor = (base.repeat(reps)[start : start + numel] * scale).reshape(shape)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch_dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush(final=False)
        shards[-1][name] = tensor
        sizes[-1] += nbytes
        total += nbytes
    flush(final=True)
    # rename to the -of- convention and write the index
    count = len(sizes)
    final_map = {}
    for i in range(1, count + 1):
        old = directory / f"model-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{count:05d}.safetensors"
        old.rename(directory / new)
        final_map[f"model-{i:05d}.safetensors"] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final_map[v] for k, v in weight_map.items()}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    config.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    (directory / ".complete").write_text("ok\n", encoding="utf-8")
    return directory


def checkpoint_for(cache: Path, arch_name: str, arch: dict | None = None, log=lambda m: None) -> Path:
    """The cached checkpoint directory of ``arch_name`` (written on first use)."""
    return write_llama_checkpoint(cache / f"llama-{arch_name}", arch or ARCHS[arch_name], log=log)


# --------------------------------------------------------------------------------------------
# the worker (one configuration in a fresh process)


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status("VmRSS")


def _peak() -> int:
    """Peak RSS of this process: ``VmHWM``, the high-water mark of its own address space.
    (``ru_maxrss`` is not usable here: Linux carries the parent's resident size at fork over
    into the child's ``ru_maxrss`` across exec, so a child of a big parent reports at least that.)"""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _imports() -> None:
    """The same imports for every configuration (the import baseline measures exactly these)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401

    import qlora_plugins.core.quant_linear  # noqa: F401
    import qlora_plugins.core.registry  # noqa: F401
    import qlora_plugins.core.training  # noqa: F401
    from qlora_plugins.builtin_plugins import adapter_lora, lora_quant_layer  # noqa: F401


def load_ours(path: Path, mode: str, gc: bool, lora: dict) -> tuple[Any, dict]:
    """Load ``path`` through our plugins: quantizer (``none``/``nf4``/...), prepare, LoRA."""
    import torch

    from qlora_plugins.core import modeling
    from qlora_plugins.core.interfaces import AdapterContext, ModelRequest
    from qlora_plugins.core.registry import create_registry
    from qlora_plugins.core.training import prepare_for_kbit_training

    registry = create_registry(load_entrypoints=False)
    if mode.startswith("qlora"):
        quantizer = registry.create("quantizer", "nf4", {"double_quant": True, "blocksize": 64})
    else:
        quantizer = registry.create("quantizer", "none", {})
    # ``*_bf16``: model.dtype bfloat16 (unquantized weights and compute in bf16; adapters stay fp32)
    dtype = torch.bfloat16 if "bf16" in mode else torch.float32
    # ``*_frozen16``: model.frozen_dtype bfloat16 (embeddings and head stored in bf16, fp32 compute)
    frozen_dtype = torch.bfloat16 if "frozen16" in mode else None
    request = ModelRequest(
        path=path,
        task="causal_lm",
        auto_class=modeling.auto_class("causal_lm"),
        dtype=dtype,
        skip_modules=list(modeling.DEFAULT_SKIP_MODULES),
        frozen_dtype=frozen_dtype,
    )
    t0 = time.perf_counter()
    model = quantizer.load_model(request)
    load_s = time.perf_counter() - t0
    facts = {"load_s": load_s, "load_peak": _peak(), "rss_after_load": _rss_now(), "model_bytes": model_bytes(model)}
    footprint = quantizer.footprint(model)
    facts["quantized_bytes"] = footprint.quantized_bytes
    facts["load_path"] = quantizer.metadata().get("load")
    prepare_for_kbit_training(model, gc)
    if frozen_dtype is not None:  # as the pipeline does
        from qlora_plugins.core.frozen import keep_frozen_16bit

        keep_frozen_16bit(model, frozen_dtype, dtype)
    if mode.startswith("full"):
        adapter = registry.create("adapter", "full", {})
    else:
        adapter = registry.create("adapter", "lora", lora)
    model = adapter.attach(model, AdapterContext(task="causal_lm", quantized=footprint.quantized_params > 0))
    return model, facts


def load_anchor(path: Path, gc: bool, lora: dict) -> tuple[Any, dict]:
    """transformers + bitsandbytes 4-bit + peft, as their documentation shows."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    facts = {"load_s": load_s, "load_peak": _peak(), "rss_after_load": _rss_now(), "model_bytes": model_bytes(model)}
    try:
        facts["quantized_bytes"] = int(model.get_memory_footprint())
    except Exception:  # pragma: no cover - informative only
        pass
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    return model, facts


def model_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (each storage once): the loaded model's size."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker(spec: dict) -> dict:
    """Run one configuration; return its figures."""
    t_start = time.perf_counter()
    _imports()
    import torch

    torch.manual_seed(0)
    out: dict[str, Any] = {
        "mode": spec["mode"],
        "import_peak": _peak(),
        "import_rss": _rss_now(),
        "import_s": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }
    if spec["mode"] == "baseline":
        out["peak"] = _peak()
        return out
    path = Path(spec["path"])
    gc = not spec["mode"].endswith("_nogc")
    lora = spec.get("lora", LORA)
    _matmul_path(spec["mode"])
    if spec["mode"].startswith("anchor"):
        model, facts = load_anchor(path, gc, lora)
    else:
        from qlora_plugins.core.streaming import limit_heap_fragmentation

        if not spec["mode"].endswith("_plain"):
            limit_heap_fragmentation()  # as `qlora run` does for every run, quantized or not
        model, facts = load_ours(path, spec["mode"], gc, lora)
    out.update(facts)
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(4, min(vocab, 30000), (spec["batch"], spec["seq"]), generator=gen)
    model.train()
    out["rss_before_steps"] = _rss_now()
    out["peak_before_steps"] = _peak()
    times, losses = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out["step_times"] = times
    out["losses"] = losses
    out["peak"] = _peak()
    out["rss_end"] = _rss_now()
    return out


def _matmul_path(mode: str) -> None:
    """``*_whole`` modes force QuantLinear's whole-weight path; every other mode takes the default."""
    if mode.endswith("_whole"):
        os.environ["QLORA_PLUGINS_MATMUL"] = "whole"
    else:
        os.environ.pop("QLORA_PLUGINS_MATMUL", None)


def timing_worker(spec: dict) -> dict:
    """Step times of several configurations loaded into ONE process, stepped interleaved
    (A B C A B C ...): machine load hits them alike, so the ratios are far less noisy than across
    processes. Memory figures come from the fresh-process runs, not from here."""
    _imports()
    import torch

    path = Path(spec["path"])
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(4, 30000, (spec["batch"], spec["seq"]), generator=gen)
    runs = {}
    from qlora_plugins.core.streaming import limit_heap_fragmentation

    limit_heap_fragmentation()  # one process: our setting applies to the anchor's steps too
    for mode in spec["modes"]:
        torch.manual_seed(0)
        gc = not mode.endswith("_nogc")
        model, _ = load_anchor(path, gc, LORA) if mode.startswith("anchor") else load_ours(path, mode, gc, LORA)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[mode] = (model, params, torch.optim.AdamW(params, lr=1e-4))
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    cpu: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(spec["steps"]):
        for mode, (model, params, optimizer) in runs.items():
            _matmul_path(mode)
            t0, c0 = time.perf_counter(), time.process_time()
            model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    return {"mode": "timing", "step_times": times, "cpu_times": cpu}


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    """Run :func:`worker` in a fresh Python process and parse its JSON."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"mode": spec["mode"], "error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "returncode": proc.returncode}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# the parent


def _mb(x: float | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def _median_step(result: dict, warmup: int) -> float | None:
    times = result.get("step_times") or []
    kept = times[warmup:] or times
    return statistics.median(kept) if kept else None


def summarize(runs: list[dict], warmup: int) -> dict:
    """Median over repeats of each figure; peaks in MB (and over the import baseline)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0].get("error") if runs else "not run"}

    def med(key: str) -> float | None:
        vals = [r[key] for r in good if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    steps = [s for s in (_median_step(r, warmup) for r in good) if s is not None]
    out = {
        "runs": len(good),
        "peak_mb": _mb(med("peak")),
        "load_peak_mb": _mb(med("load_peak")),
        "rss_after_load_mb": _mb(med("rss_after_load")),
        "import_peak_mb": _mb(med("import_peak")),
        "load_s": round(med("load_s"), 2) if med("load_s") is not None else None,
        "step_s": round(statistics.median(steps), 3) if steps else None,
        "step_s_each_run": [round(s, 3) for s in steps],
        "quantized_mb": _mb(med("quantized_bytes")),
        "model_mb": _mb(med("model_bytes")),
        "trainable_params": good[0].get("trainable_params"),
        "first_loss": good[0].get("losses", [None])[0],
        "load_path": good[0].get("load_path"),
    }
    return out


def largest_tensor_bytes(path: Path) -> int:
    """The largest single tensor of a safetensors checkpoint, in bytes (read from the headers)."""
    from qlora_plugins.core.streaming import tensor_locations

    return max(
        (end - start for shard in sorted(Path(path).glob("*.safetensors")) for _, _, start, end in tensor_locations(shard).values()),
        default=0,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare_model(path: Path, modes: list[str], args: argparse.Namespace, log) -> dict:
    """Run ``modes`` (and the import baseline) interleaved ``args.repeats`` times on ``path``."""
    results: dict[str, list[dict]] = {m: [] for m in ["baseline", *modes]}
    for rnd in range(args.repeats):
        for mode in ["baseline", *modes]:
            spec = {"mode": mode, "path": str(path), "batch": args.batch, "seq": args.seq, "steps": args.steps}
            if mode == "baseline" and rnd > 0:
                continue
            log(f"[{path.name}] round {rnd + 1}/{args.repeats}: {mode}")
            res = run_worker(spec)
            if "error" in res:
                log(f"  {mode} failed: {res['error']}")
            results[mode].append(res)
    table = {mode: summarize(runs, args.warmup) for mode, runs in results.items()}
    timing = None
    if args.timing_rounds and "lora" in modes:
        log(f"[{path.name}] step times: {', '.join(modes)} in one process, interleaved, {args.timing_rounds} rounds")
        timing = run_worker(
            {
                "mode": "timing",
                "modes": [m for m in modes if not m.endswith("_plain")],
                "path": str(path),
                "batch": args.batch,
                "seq": args.seq,
                "steps": args.timing_rounds,
            }
        )
    base = table["baseline"].get("peak_mb") or 0.0
    for mode, row in table.items():
        if mode != "baseline" and row.get("peak_mb") is not None:
            row["peak_over_baseline_mb"] = round(row["peak_mb"] - base, 1)
            row["load_peak_over_baseline_mb"] = round(row["load_peak_mb"] - base, 1)
    # the loading target: import baseline + quantized model + 3x the largest single tensor
    largest_mb = _mb(largest_tensor_bytes(path))
    for mode in modes:
        row = table[mode]
        if mode.startswith("qlora") and row.get("load_peak_mb") is not None and row.get("model_mb") is not None:
            # model_mb: the loaded model (4-bit codes, constants, unquantized embeddings and norms)
            bound = round(base + row["model_mb"] + 3 * largest_mb, 1)
            row["load_target"] = {"largest_tensor_mb": largest_mb, "bound_mb": bound, "met": row["load_peak_mb"] <= bound}
    lora, ratios = table.get("lora", {}), {}
    for mode in modes:
        if mode == "lora":
            continue
        row = table[mode]
        ratios[f"{mode}/lora"] = {
            "peak": _ratio(row.get("peak_mb"), lora.get("peak_mb")),
            "peak_over_baseline": _ratio(row.get("peak_over_baseline_mb"), lora.get("peak_over_baseline_mb")),
            "step_time_separate_processes": _ratio(row.get("step_s"), lora.get("step_s")),
            "load_peak": _ratio(row.get("load_peak_mb"), lora.get("load_peak_mb")),
        }
    if "lora_plain" in table and table["lora_plain"].get("peak_mb"):
        plain = table["lora_plain"]
        for mode in modes:
            if mode not in ("lora", "lora_plain"):
                ratios[f"{mode}/lora"]["peak_vs_lora_plain"] = _ratio(table[mode].get("peak_mb"), plain["peak_mb"])
    if timing is not None and "error" not in timing:
        wall, cpu = timing["step_times"], timing["cpu_times"]
        kept = range(args.warmup, len(wall["lora"]))
        timing_table = {
            m: {
                "step_s": round(statistics.median(wall[m][i] for i in kept), 3),
                "cpu_s": round(statistics.median(cpu[m][i] for i in kept), 3),
            }
            for m in wall
        }
        for mode in wall:
            if mode != "lora":
                # the ratio of neighbouring steps in each round, then the median over rounds
                ratios[f"{mode}/lora"]["step_time"] = round(statistics.median(wall[mode][i] / wall["lora"][i] for i in kept), 3)
                ratios[f"{mode}/lora"]["step_cpu_time"] = round(statistics.median(cpu[mode][i] / cpu["lora"][i] for i in kept), 3)
        return {"checkpoint": str(path), "configs": table, "step_times_same_process": timing_table, "ratios": ratios}
    if timing is not None:
        log(f"  timing failed: {timing['error']}")
    return {"checkpoint": str(path), "configs": table, "ratios": ratios}


def gc_comparison(path: Path, args: argparse.Namespace, log) -> dict:
    """Our QLoRA with gradient checkpointing on and off at a larger batch (one step each,
    interleaved); the step's peak over the set-up model is activations (+ identical grads/states)."""
    rows: dict[str, list[dict]] = {"qlora": [], "qlora_nogc": []}
    for _ in range(args.gc_repeats):
        for mode in rows:
            log(f"[{path.name}] gradient checkpointing comparison: {mode} at {args.gc_batch}x{args.gc_seq}")
            rows[mode].append(
                run_worker({"mode": mode, "path": str(path), "batch": args.gc_batch, "seq": args.gc_seq, "steps": args.gc_steps})
            )
    out: dict[str, Any] = {"batch": args.gc_batch, "seq": args.gc_seq}
    for mode, runs in rows.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            out[mode] = {"error": runs[0].get("error") if runs else "not run"}
            continue
        step_peak = statistics.median(r["peak"] - r["rss_before_steps"] for r in good)
        out[mode] = {
            "peak_mb": _mb(statistics.median(r["peak"] for r in good)),
            "step_peak_over_setup_mb": _mb(step_peak),
            "step_s": round(statistics.median(statistics.median(r["step_times"]) for r in good), 2),
        }
    if "step_peak_over_setup_mb" in out.get("qlora", {}) and "step_peak_over_setup_mb" in out.get("qlora_nogc", {}):
        on, off = out["qlora"]["step_peak_over_setup_mb"], out["qlora_nogc"]["step_peak_over_setup_mb"]
        out["checkpointing_saves_mb"] = round(off - on, 1)
        out["activation_ratio_on_off"] = _ratio(on, off)
        out["step_time_ratio_on_off"] = _ratio(out["qlora"]["step_s"], out["qlora_nogc"]["step_s"])
    return out


def versions() -> dict:
    """The pipeline's ``report.json`` versions, plus safetensors (the loader's reader)."""
    import importlib.metadata as md

    from qlora_plugins.core.pipeline import versions as run_versions

    return {**run_versions(), "safetensors": md.version("safetensors")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="336m,697m", help="comma-separated: " + ", ".join(ARCHS))
    parser.add_argument(
        "--modes", default="lora,lora_plain,qlora,qlora_frozen16,qlora_whole,qlora_bf16,anchor", help="configurations besides the baseline"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per memory process")
    parser.add_argument("--warmup", type=int, default=1, help="steps (rounds) left out of the medians")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the fresh-process (memory) runs")
    parser.add_argument(
        "--timing-rounds", type=int, default=8, help="rounds of interleaved steps in the one-process timing run (0: skip it)"
    )
    parser.add_argument("--gc-batch", type=int, default=8)
    parser.add_argument("--gc-seq", type=int, default=256)
    parser.add_argument("--gc-steps", type=int, default=1)
    parser.add_argument("--gc-repeats", type=int, default=1)
    parser.add_argument("--no-gc-comparison", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("QLORA_BENCH_CACHE", "/tmp/qlora-bench")))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(timing_worker(spec) if spec["mode"] == "timing" else worker(spec)), flush=True)
        return
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    report: dict[str, Any] = {
        "benchmark": "memory",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": None, "platform": platform.platform()},
        "versions": versions(),
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "lora": LORA,
            "optimizer": "torch AdamW",
            "gradient_checkpointing": "on (modes ending _nogc: off)",
            "checkpoint_dtype": "float32",
        },
        "models": {},
    }
    import torch

    report["machine"]["torch_threads"] = torch.get_num_threads()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = checkpoint_for(args.cache, name, log=log)
        entry = compare_model(path, modes, args, log)
        entry["arch"] = ARCHS[name]
        if not args.no_gc_comparison and name == args.models.split(",")[0].strip():
            entry["gradient_checkpointing"] = gc_comparison(path, args, log)
        report["models"][name] = entry
    targets = {}
    for name, entry in report["models"].items():
        r = entry["ratios"].get("qlora/lora", {})
        plain = r.get("peak_vs_lora_plain")
        targets[name] = {
            "memory_ratio_vs_plain_lora": plain,
            "memory_target_0.5_met": plain is not None and plain <= 0.5,
            "memory_ratio_vs_our_lora": r.get("peak"),
            "memory_ratio_vs_our_lora_bf16_compute": entry["ratios"].get("qlora_bf16/lora", {}).get("peak"),
            "step_time_ratio": r.get("step_time"),
            "step_time_target_1.10_met": r.get("step_time") is not None and r["step_time"] <= 1.10,
            "step_time_ratio_bf16_compute": entry["ratios"].get("qlora_bf16/lora", {}).get("step_time"),
            "load_peak_target_met": entry["configs"].get("qlora", {}).get("load_target", {}).get("met"),
        }
    report["targets"] = targets
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
