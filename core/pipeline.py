"""The pipeline: load -> quantize -> prepare -> attach adapter -> data -> train -> export -> report.

Everything that can fail because of user input (config, plugin names and options, model and data
files, the output directory) is checked before the run directory is created, so bad input never
leaves a half-written run behind.
"""

from __future__ import annotations

import contextlib
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
from qlora_plugins.core.config import Config, ResolvedPlugins, load_yaml, resolve_plugins, resolved_dict
from qlora_plugins.core.errors import ConfigError, ModelError, PluginError, QloraError, TrainingError, UnsafeOutputError
from qlora_plugins.core.exporting import run_exports
from qlora_plugins.core.interfaces import AdapterContext, DataContext, ExportCheck, ExportContext, ModelRequest
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
    dumps,
    prepare_run_dir,
    read_metrics,
)
from qlora_plugins.core.safety import (
    asides_of,
    check_holds_no_input,
    check_no_links,
    is_run_marker,
    not_a_run_because,
    remove_aside,
)
from qlora_plugins.core.sources import materialize_source
from qlora_plugins.core.checkpointing import (
    config_changes,
    list_checkpoints,
    remove_stale_temporaries,
    restore_latest,
    save_training_checkpoint,
)
from qlora_plugins.core.training import IGNORE_INDEX, TrainLoop, TrainState, prepare_for_kbit_training, total_steps, trainable_parameters

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
    check_exporters(plugins.exporters, ExportCheck(task, plugins.quantizer, plugins.adapter, model_dir), registry)
    return Checked(config, plugins, model_dir)


def check_exporters(exporters: list, context: ExportCheck, registry: Any, paths: list[str] | None = None) -> None:
    """Each exporter's :meth:`Exporter.check`, before anything is loaded or trained; anything but
    an input error is a fault of the exporter and names it."""
    for i, exporter in enumerate(exporters):
        where = paths[i] if paths else f"export[{i}]"
        try:
            exporter.check(attrs.evolve(context, config_path=where))
        except QloraError:
            raise
        except Exception as exc:
            source = registry.registration("exporter", exporter.name).source.describe()
            raise PluginError(f"{where}: exporter '{exporter.name}' ({source}) failed its check: {type(exc).__name__}: {_first_line(exc)}") from exc


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
    if not is_run_marker(out / RUN_MARKER):
        raise QloraError(f"--resume: {out} is not a qlora run directory (its {RUN_MARKER} was not written by qlora-plugins)")
    try:
        old = load_yaml((out / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, QloraError) as exc:
        raise QloraError(f"--resume: cannot read {out / 'config.yaml'}: {_first_line(exc)}") from None
    if not isinstance(old, dict):
        raise QloraError(f"--resume: {out / 'config.yaml'} is not a run config")
    changes = config_changes(old, resolved)
    if changes:
        raise ConfigError("--resume", "the config changed in ways that would change the result: " + "; ".join(changes))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps already covered by the checkpoint (no gaps, no duplicates)."""
    kept = [r for r in read_metrics(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in kept))


def run_inputs(config: Config, plugins: ResolvedPlugins, model_dir: Path | None) -> list[tuple[str, Path | None]]:
    """What a run reads: a directory holding one of these is never replaced (``--force``)."""
    inputs: list[tuple[str, Path | None]] = [("the config file", config.source), ("model.path", model_dir)]
    if plugins.data is not None:
        inputs += [("the data", path) for path in plugins.data.input_paths(config.base_dir)]
    return inputs


def check_output(out: Path, inputs: list[tuple[str, Path | None]], force: bool, resume: bool) -> None:
    """Before anything loads: refuse an output the run may not write into or replace."""
    if out.exists() and not out.is_dir():
        raise QloraError(f"--output: {out} exists and is not a directory")
    if not out.exists():
        return
    if resume:
        check_no_links(out, "--resume")
        return
    if any(out.iterdir()):
        if not force:
            raise QloraError(f"--output: {out} exists and is not empty; pass --force to replace it (or --resume to continue it)")
        reason = not_a_run_because(out)
        if reason:
            raise UnsafeOutputError(f"--output: {out} is not a qlora run directory ({reason}); refusing to delete it even with --force")
        check_holds_no_input(out, inputs, "--output")


def _failure(exc: BaseException) -> str:
    """How a failure reads in run.json: the one-line message of an input error, the exception's
    type too for anything else (``SystemExit: 0`` rather than ``0``)."""
    text = _first_line(exc)
    return (text if isinstance(exc, QloraError) else f"{type(exc).__name__}: {text}")[:500]


def _marker(report: dict, status: str) -> dict:
    return {"tool": "qlora-plugins", "config": report["config"], "status": status}


def _checkpoint_finished_training(out: Path, state: TrainState, save: Callable[[TrainState], Any], log: Log) -> None:
    """Interrupted after training (saving the adapter, exporting): checkpoint the last step, so
    that ``--resume`` goes straight to the exports instead of training again."""
    found = list_checkpoints(out)
    if state.step > 0 and not (found and found[-1].name.endswith(f"{state.step:08d}")):
        with contextlib.suppress(QloraError):
            save(state)
            log(f"Interrupted after training: checkpoint of step {state.step} saved; continue with --resume")


def _restore_previous(out: Path, aside: Path | None, log: Log) -> None:
    """After a failed ``--force`` run: put the replaced run back when the new one left nothing to
    resume; otherwise keep both and say where the previous one is."""
    import shutil

    if aside is None:
        return
    if list_checkpoints(out):
        log(f"The replaced run is kept in {aside} until this run completes (qlora run --resume {out})")
        return
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.rename(aside, out)
    except OSError:
        log(f"The replaced run is kept in {aside}")


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
    inputs = run_inputs(config, plugins, model_dir)
    check_output(out, inputs, force, resume)

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
        if config.model.task == "causal_lm" and not any(label != IGNORE_INDEX for example in splits.train for label in example["labels"]):
            raise QloraError(f"data: no token of the training split is trained (every label is masked; data.name={plugins.data.name})")

    resolved = resolved_dict(config, plugins)
    if config.model.source:  # the resolved config names the materialized checkpoint (report.json keeps the source)
        resolved["model"]["path"], resolved["model"]["source"] = str(model_dir), None
    if resume:
        _check_resume(out, resolved)

    report: dict[str, Any] = {"status": "running", "run_dir": str(out), "config": str(config.source) if config.source else None}
    notes: list[str] = []
    if splits is not None and getattr(splits, "dropped", 0):
        notes.append(f"data: {splits.dropped} of {splits.rows} rows dropped (no response left to learn within "
                     f"data.max_length={getattr(plugins.data.options, 'max_length', '?')}, or an empty response)")
        log(notes[-1])
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
    adapter_context = AdapterContext(task=config.model.task, quantized=footprint.quantized_params > 0)
    model = plugins.adapter.attach(model, adapter_context)
    params = trainable_parameters(model)
    report["parameters"] = parameter_report(model, footprint)
    if not params:
        raise TrainingError("adapter: the configuration leaves nothing trainable (check adapter.target_modules)")

    # everything a user can get wrong has been checked: only now is the run directory written
    aside = None
    if resume:
        check_no_links(out, "--resume")
        remove_stale_temporaries(out)
    else:
        aside = prepare_run_dir(out, force, inputs)
    metrics, trained = None, None
    try:
        atomic_write_json(out / RUN_MARKER, _marker(report, "running"))  # first: the marker makes the directory ours
        atomic_write_yaml(out / "config.yaml", resolved)
        meta = {"config": resolved, "plugins": report["plugins"], "versions": report["versions"]}
        if train_cfg.enabled:
            steps = total_steps(train_cfg, len(splits.train))
            optimizer = plugins.optimizer.create(params, torch.device(device))
            note = plugins.optimizer.runtime_note(torch.device(device))
            if note:
                notes.append(note)
                log(note)
            scheduler = _scheduler(train_cfg.lr_scheduler, optimizer, train_cfg.warmup_steps, steps)
            state, resumed_from = TrainState(), None
            if resume:
                checkpoint, restored = restore_latest(out, model, optimizer, scheduler, log)
                if restored is not None:
                    state, resumed_from = restored, restored.step
                    log(f"Resuming from {checkpoint} (step {state.step})")
            if resume:
                _truncate_metrics(out / "metrics.jsonl", state.step)
            metrics = MetricsWriter(out / "metrics.jsonl")

            def save(at: TrainState) -> None:
                save_training_checkpoint(out, model, optimizer, scheduler, at, meta, train_cfg.keep_checkpoints)

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
            trained = (state, save)  # an interrupt from here on keeps the finished training (below)
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
                "data_rows": getattr(splits, "rows", None),
                "dropped_rows": getattr(splits, "dropped", 0),
                "resumed_from_step": resumed_from,
            }
        if metrics is None:  # no training: an empty metrics.jsonl, as every run directory has
            metrics = MetricsWriter(out / "metrics.jsonl")
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
        from qlora_plugins.core.errors import Terminated

        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {_failure(exc)}"
        marker = _marker(report, status)
        if isinstance(exc, Terminated):
            marker["signal"] = "SIGTERM"
        if isinstance(exc, KeyboardInterrupt) and trained is not None:
            _checkpoint_finished_training(out, *trained, log)
        with contextlib.suppress(QloraError):
            atomic_write_json(out / RUN_MARKER, marker)
        if metrics is not None:
            metrics.close()
            metrics = None
        _restore_previous(out, aside, log)
        raise
    finally:
        if metrics is not None:
            metrics.close()

    memory = {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": load_peak}
    if device == "cuda":
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    report["memory"] = memory
    timings["total_s"] = round(time.perf_counter() - started, 3)
    report["timings"] = timings
    report["notes"] = notes
    try:
        if plot_loss(out / "metrics.jsonl", out / "loss.png", f"{model_dir.name}: {plugins.quantizer.name} + {plugins.adapter.name}"):
            report["loss_plot"] = str(out / "loss.png")
        report["status"] = "completed"
        atomic_write_json(out / "report.json", report)
        atomic_write_json(out / RUN_MARKER, _marker(report, "completed"))
    except BaseException as exc:
        with contextlib.suppress(QloraError):
            atomic_write_json(out / RUN_MARKER, _marker(report, "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {_failure(exc)}"))
        _restore_previous(out, aside, log)
        raise
    # the new run is complete: only now are the runs it replaced deleted
    for old in ([aside] if aside is not None else []) + asides_of(out):
        remove_aside(old)
    return report
