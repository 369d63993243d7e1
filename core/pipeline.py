"""The pipeline: load -> quantize -> prepare -> attach adapter -> data -> train -> export -> report.

Everything that can fail because of user input (config, plugin names and options, model and data
files, the output directory) is checked before the run directory is created, so bad input never
leaves a half-written run behind.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from qlora_plugins.core import modeling
from qlora_plugins.core.config import Config, ResolvedPlugins, resolve_plugins, resolved_dict
from qlora_plugins.core.errors import ConfigError, ModelError, PluginError, QloraError, TrainingError
from qlora_plugins.core.exporting import run_exports
from qlora_plugins.core.interfaces import AdapterContext, DataContext, ExportContext, ModelRequest
from qlora_plugins.core.options import options_to_dict
from qlora_plugins.core.report import peak_rss_bytes, plot_loss
from qlora_plugins.core.streaming import limit_heap_fragmentation
from qlora_plugins.core.rundir import (
    RUN_MARKER,
    MetricsWriter,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    prepare_run_dir,
    read_metrics,
)
from qlora_plugins.core.sources import materialize_source
from qlora_plugins.core.checkpointing import (
    config_changes,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    remove_stale_temporaries,
    save_checkpoint,
)
from qlora_plugins.core.training import TrainLoop, TrainState, prepare_for_kbit_training, total_steps, trainable_parameters

Log = Callable[[str], None]


@attrs.define
class Checked:
    """A config whose plugins are resolved and whose files exist (what ``qlora validate`` proves)."""

    config: Config
    plugins: ResolvedPlugins
    model_dir: Path | None


def check(config: Config, registry: Any, materialize: bool = False) -> Checked:
    """Resolve plugins, check task compatibility and that the model and data files exist.

    Loads no model. With ``materialize`` a ``model.source`` is created in the cache if needed.
    """
    plugins = resolve_plugins(config, registry)
    task = config.model.task
    if plugins.data is not None:
        if task not in plugins.data.tasks:
            raise ConfigError("data.name", f"data format '{plugins.data.name}' supports task(s) {', '.join(plugins.data.tasks)}, not model.task={task}")
        plugins.data.check(config.base_dir, "data")
    model_dir = None
    if config.model.path is not None:
        model_dir = config.resolve_path(config.model.path)
        modeling.check_model_dir(model_dir)
    else:
        source = registry.get("model_source", config.model.source, "model.source")
        if source.task != task:
            raise ConfigError("model.task", f"model source '{source.name}' is a {source.task} model, but model.task is {task}")
        if materialize:
            model_dir = materialize_source(registry, config.model.source)
    return Checked(config, plugins, model_dir)


def model_request(config: Config, model_dir: Path, device: str, num_labels: int | None) -> ModelRequest:
    """How the quantizer should load the base model."""
    kwargs = {}
    if config.model.task == "seq_cls":
        kwargs["num_labels"] = config.model.num_labels or num_labels or 2
    return ModelRequest(
        path=model_dir,
        task=config.model.task,
        auto_class=modeling.auto_class(config.model.task),
        dtype=modeling.torch_dtype(config.model.dtype),
        device=device,
        trust_remote_code=config.model.trust_remote_code,
        model_kwargs=kwargs,
        skip_modules=list(modeling.DEFAULT_SKIP_MODULES),
        frozen_dtype=modeling.torch_dtype(config.model.frozen_dtype) if config.model.frozen_dtype else None,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _raised_by_transformers(exc: BaseException) -> bool:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}transformers{os.sep}" in frames[-1].filename


def load_base(plugins: ResolvedPlugins, request: ModelRequest, tokenizer: Any, registry: Any = None) -> Any:
    """Load the base model through the quantizer. Unreadable or mismatched checkpoints are a
    ModelError naming the model directory; anything else the quantizer raises is a PluginError
    naming the quantizer and its distribution."""
    from safetensors import SafetensorError

    quantizer = plugins.quantizer
    try:
        model = quantizer.load_model(request)
    except QloraError:
        raise
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"model.path: cannot load {request.path}: {_first_line(exc)}") from None
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":  # torch's weights_only=True refused a pickle file
            raise ModelError(f"model.path: {request.path}: pytorch_model.bin cannot be loaded safely (weights_only=True refused it): "
                             f"{_first_line(exc)}; convert the checkpoint to safetensors") from None
        streamed = str(getattr(quantizer, "load_path", "") or "")
        if "shape" in streamed:
            detail = streamed.partition("(")[2].rstrip(")")
            raise ModelError(f"model.path: cannot load {request.path}: weight shapes do not match config.json ({detail})") from None
        if _raised_by_transformers(exc):  # the checkpoint or its config, not the quantizer
            raise ModelError(f"model.path: cannot load {request.path}: {_first_line(exc)}") from None
        where = ""
        if registry is not None:
            where = f" ({registry.registration('quantizer', quantizer.name).source.describe()})"
        raise PluginError(f"quantizer '{quantizer.name}'{where} failed while loading {request.path}: {type(exc).__name__}: {_first_line(exc)}") from exc
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_report(model: Any, footprint: Any) -> dict:
    """Logical parameter counts: integer-typed parameters are packed quantized storage, whose
    logical count comes from the quantizer's footprint."""
    total = trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        if p.dtype.is_floating_point:
            total += p.numel()
    total += footprint.quantized_params
    return {
        "total": total,
        "trainable": trainable,
        "quantized": footprint.quantized_params,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
    }


def plugin_report(registry: Any, plugins: ResolvedPlugins) -> dict:
    """Name, distribution, version and options of each plugin used."""

    def one(kind: str, plugin: Any) -> dict:
        reg = registry.registration(kind, plugin.name)
        return {"name": plugin.name, "distribution": reg.source.distribution, "version": reg.source.version, "options": options_to_dict(plugin.options)}

    out = {
        "quantizer": one("quantizer", plugins.quantizer),
        "adapter": one("adapter", plugins.adapter),
        "optimizer": one("optimizer", plugins.optimizer),
    }
    if plugins.data is not None:
        out["data"] = one("data_format", plugins.data)
    out["exporters"] = [one("exporter", e) for e in plugins.exporters]
    return out


def versions() -> dict:
    """Versions of the libraries the run used."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "qlora-plugins"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _scheduler(name: str, optimizer: Any, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _check_resume(out: Path, resolved: dict) -> None:
    """Refuse to resume into something that is not a run, or with a result-changing config."""
    import yaml

    if not (out / RUN_MARKER).is_file() or not (out / "config.yaml").is_file():
        raise QloraError(f"--resume: {out} is not a qlora run directory (no {RUN_MARKER} / config.yaml)")
    old = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    changes = config_changes(old, resolved)
    if changes:
        raise ConfigError("--resume", "the config changed in ways that would change the result: " + "; ".join(changes))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps already covered by the checkpoint (no gaps, no duplicates)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def run(config: Config, registry: Any, output_dir: Path, force: bool = False, log: Log = lambda m: None, progress: bool = True,
        resume: bool = False) -> dict:
    """Run the whole pipeline into ``output_dir``; return the report. With ``resume``, continue the
    run in ``output_dir`` from its latest complete checkpoint."""
    import torch

    started = time.perf_counter()
    from safetensors import SafetensorError
    checked = check(config, registry, materialize=True)
    plugins, model_dir = checked.plugins, checked.model_dir
    train_cfg = config.train
    device = modeling.choose_device(train_cfg.device)
    out = output_dir.resolve()
    if model_dir is not None and (out == model_dir.resolve() or model_dir.resolve() in out.parents):
        raise ConfigError("--output", f"{out} is inside the model directory {model_dir}; choose another output")
    if out.exists() and not out.is_dir():
        raise QloraError(f"--output: {out} exists and is not a directory")
    if not resume and out.exists() and any(out.iterdir()) and not force:
        raise QloraError(f"--output: {out} exists and is not empty; pass --force to replace it (or --resume to continue it)")

    if train_cfg.threads:  # tiny models: one thread avoids OpenMP spin-waits on a busy machine
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    tokenizer = modeling.load_tokenizer(model_dir, config.model.trust_remote_code)
    splits = None
    if train_cfg.enabled:
        log(f"Loading data with '{plugins.data.name}'")
        splits = plugins.data.load(DataContext(tokenizer, config.model.task, train_cfg.seed, config.base_dir, "data"))
        if len(splits.train) == 0:
            raise QloraError("data: the training split is empty")

    resolved = resolved_dict(config, plugins)
    if config.model.source:  # the resolved config names the materialized checkpoint (report.json keeps the source)
        resolved["model"]["path"], resolved["model"]["source"] = str(model_dir), None
    checkpoint = None
    if resume:
        _check_resume(out, resolved)

    report: dict[str, Any] = {"status": "running", "run_dir": str(out), "config": str(config.source) if config.source else None}
    notes: list[str] = []
    report["model"] = {"path": str(model_dir), "source": config.model.source, "task": config.model.task, "dtype": config.model.dtype,
                       "trust_remote_code": config.model.trust_remote_code}
    report["plugins"] = plugin_report(registry, plugins)
    report["versions"] = versions()
    report["device"] = device
    timings: dict[str, float] = {}

    log(f"Loading {model_dir} with quantizer '{plugins.quantizer.name}' on {device}")
    t0 = time.perf_counter()
    request = model_request(config, model_dir, device, splits.num_labels if splits else None)
    limit_heap_fragmentation()  # for every run: freed activations go back to the OS (streaming.py)
    model = load_base(plugins, request, tokenizer, registry)
    footprint = plugins.quantizer.footprint(model)
    timings["load_s"] = round(time.perf_counter() - t0, 3)
    load_peak = peak_rss_bytes()
    report["quantization"] = {
        "quantized_params": footprint.quantized_params,
        "quantized_bytes": footprint.quantized_bytes,
        "bits_per_param": footprint.bits_per_param,
        **plugins.quantizer.metadata(),
    }

    prepare_for_kbit_training(model, train_cfg.gradient_checkpointing and train_cfg.enabled)
    if request.frozen_dtype is not None:
        from qlora_plugins.core.frozen import keep_frozen_16bit

        keep_frozen_16bit(model, request.frozen_dtype, request.dtype)
    adapter_context = AdapterContext(task=config.model.task, quantized=footprint.quantized_params > 0)
    model = plugins.adapter.attach(model, adapter_context)
    params = trainable_parameters(model)
    if request.frozen_dtype is not None and any(p.dtype == request.frozen_dtype for p in params):
        raise ConfigError("model.frozen_dtype", f"adapter '{plugins.adapter.name}' trains weights kept in "
                          f"{config.model.frozen_dtype}; use it only with adapters that keep the base frozen (lora)")
    report["parameters"] = parameter_report(model, footprint)
    if not params:
        raise TrainingError("adapter: the configuration leaves nothing trainable (check adapter.target_modules)")

    # everything a user can get wrong has been checked: only now is the run directory written
    if resume:
        remove_stale_temporaries(out)
        checkpoint = latest_checkpoint(out)
    else:
        prepare_run_dir(out, force)
    atomic_write_yaml(out / "config.yaml", resolved)
    atomic_write_json(out / RUN_MARKER, {"tool": "qlora-plugins", "config": str(config.source) if config.source else None, "status": "running"})
    if resume:
        _truncate_metrics(out / "metrics.jsonl", read_trainer_state(checkpoint)["step"] if checkpoint else 0)
    metrics = MetricsWriter(out / "metrics.jsonl")
    meta = {"config": resolved, "plugins": report["plugins"], "versions": report["versions"]}
    try:
        if train_cfg.enabled:
            steps = total_steps(train_cfg, len(splits.train))
            optimizer = plugins.optimizer.create(params, torch.device(device))
            note = plugins.optimizer.runtime_note(torch.device(device))
            if note:
                notes.append(note)
                log(note)
            scheduler = _scheduler(train_cfg.lr_scheduler, optimizer, train_cfg.warmup_steps, steps)
            state = TrainState()
            if checkpoint is not None:
                state = load_checkpoint(checkpoint, model, optimizer, scheduler)
                log(f"Resuming from {checkpoint} (step {state.step})")

            def save(at: TrainState) -> None:
                save_checkpoint(out, model, optimizer, scheduler, at, meta, train_cfg.keep_checkpoints)

            def on_step_end(at: TrainState) -> None:
                if train_cfg.checkpoint_every and at.step % train_cfg.checkpoint_every == 0:
                    save(at)

            def on_interrupt(at: TrainState) -> None:
                if at.step > 0:
                    save(at)
                    log(f"Interrupted: checkpoint of step {at.step} saved; continue with --resume")

            log(f"Training {report['parameters']['trainable']:,} parameters for {steps} steps on {len(splits.train)} examples")
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
            t0 = time.perf_counter()
            try:
                result = TrainLoop(
                    model, optimizer, scheduler, train_cfg, splits.train, splits.eval, tokenizer.pad_token_id,
                    config.model.task, device, steps, state=state, on_record=metrics.write, on_step_end=on_step_end,
                    on_interrupt=on_interrupt, progress=bar,
                ).run()
            finally:
                if bar is not None:
                    bar.close()
            timings["train_s"] = round(time.perf_counter() - t0, 3)
            times = result.step_times
            report["training"] = {
                "steps": result.steps,
                "first_loss": result.first_loss,
                "last_loss": result.last_loss,
                "eval_loss": result.eval.get("eval_loss"),
                "eval_accuracy": result.eval.get("eval_accuracy"),
                "median_step_time_s": statistics.median(times) if times else None,
                "mean_step_time_s": statistics.fmean(times) if times else None,
                "train_examples": len(splits.train),
                "eval_examples": len(splits.eval),
                "resumed_from_step": int(checkpoint.name[len("step-"):]) if checkpoint else None,
            }
        model.eval()
        try:
            with atomic_directory(out / "adapter", force=True) as tmp:
                plugins.adapter.save(model, tmp)
        except (OSError, SafetensorError) as exc:
            raise QloraError(f"cannot save the adapter to {out / 'adapter'}: {_first_line(exc)}") from None
        probe = list(splits.eval[:8] or splits.train[:8]) if splits else []
        context = ExportContext(model, tokenizer, model_dir, config.model.task, plugins.quantizer, plugins.adapter, resolved, request, probe)
        t0 = time.perf_counter()
        report["exports"] = run_exports(context, plugins.exporters, out / "exports", registry, force or resume, log)
        timings["export_s"] = round(time.perf_counter() - t0, 3)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {exc}"
        atomic_write_json(out / RUN_MARKER, {"tool": "qlora-plugins", "config": report["config"], "status": status})
        raise
    finally:
        metrics.close()

    memory = {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": load_peak}
    if device == "cuda":
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    report["memory"] = memory
    timings["total_s"] = round(time.perf_counter() - started, 3)
    report["timings"] = timings
    report["notes"] = notes
    if plot_loss(out / "metrics.jsonl", out / "loss.png", f"{model_dir.name}: {plugins.quantizer.name} + {plugins.adapter.name}"):
        report["loss_plot"] = str(out / "loss.png")
    report["status"] = "completed"
    atomic_write_json(out / "report.json", report)
    atomic_write_json(out / RUN_MARKER, {"tool": "qlora-plugins", "config": report["config"], "status": "completed"})
    return report
