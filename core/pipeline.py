"""The pipeline as named stages, each a method with typed inputs and outputs:

``check`` (everything checkable without writing: plugins, files, the output, the exporters' own
checks) -> ``prepare`` (device, seed, tokenizer, data) -> ``load`` (the base model through the
quantizer) -> ``attach`` (the adapter) -> ``open_run_dir`` -> ``train`` -> ``save_and_export``
-> ``finish`` (plot, report.json, run.json).

:class:`Pipeline` runs them in that order; a subclass (a distributed launcher, a data collator)
overrides or wraps one stage without touching the others, and ``qlora export`` reuses
``prepare``/``load`` with the saved adapter instead of training. Everything that can fail because of
user input is checked before the run directory is created, so bad input never leaves a
half-written run behind. The run report is a typed :class:`~qlora_plugins.core.run_report.RunReport`
assembled from the stages' results.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from qlora_plugins.core import modeling, progress
from qlora_plugins.core.checkpointing import (
    config_changes,
    list_checkpoints,
    remove_stale_temporaries,
    restore_latest,
    save_training_checkpoint,
)
from qlora_plugins.core.config import Config, ResolvedPlugins, load_yaml, resolve_plugins, resolved_dict
from qlora_plugins.core.errors import ConfigError, QloraError, Terminated, TrainingError
from qlora_plugins.core.exporting import run_exports
from qlora_plugins.core.hub import HubModel, check_revision, is_hub_id, repo_cache_dir
from qlora_plugins.core.hub import resolve as resolve_hub
from qlora_plugins.core.interfaces import AdapterContext, DataContext, DataSplits, ExportCheck, ExportContext, ModelRequest
from qlora_plugins.core.loading import (  # noqa: F401  (re-exported: the pipeline's public helpers)
    _first_line,
    load_base,
    model_request,
    parameter_report,
    plugin_check,
    plugin_report,
    versions,
)
from qlora_plugins.core.packing import PackingStats, collate_packed, collate_varlen, compute_dtype, pack_examples, packed_attention
from qlora_plugins.core.report import peak_rss_bytes, plot_loss
from qlora_plugins.core.run_report import RunReport, TrainingFigures
from qlora_plugins.core.rundir import (
    RUN_MARKER,
    atomic_directory,
    atomic_write_json,
    atomic_write_yaml,
    check_run_output,
    prepare_run_dir,
)
from qlora_plugins.core.safety import (
    asides_of,
    check_no_links,
    is_run_marker,
    remove_aside,
)
from qlora_plugins.core.sources import materialize_source
from qlora_plugins.core.streaming import limit_heap_fragmentation
from qlora_plugins.core.tracking import Trackers, is_metrics_process
from qlora_plugins.core.training import (
    IGNORE_INDEX,
    TrainLoop,
    TrainResult,
    TrainState,
    prepare_for_kbit_training,
    total_steps,
    trainable_parameters,
)
from qlora_plugins.core.wording import option, spelled_log

Log = Callable[[str], None]


@attrs.define
class Checked:
    """A config whose plugins are resolved and whose files exist (what ``qlora validate`` proves)."""

    config: Config
    plugins: ResolvedPlugins
    model_dir: Path | None
    #: ``model.path`` as a Hugging Face Hub id, resolved (None: a local directory or a source)
    hub: HubModel | None = None


def check(config: Config, registry: Any, materialize: bool = False) -> Checked:
    """Resolve plugins, check task compatibility and that the model and data files exist.

    Loads no model. With ``materialize`` a ``model.source`` is created in the cache if needed.
    """
    plugins = resolve_plugins(config, registry)
    task = config.model.task
    if plugins.data is not None:
        if task not in plugins.data.tasks:
            raise ConfigError(
                "data.name", f"data format '{plugins.data.name}' supports task(s) {', '.join(plugins.data.tasks)}, not model.task={task}"
            )
        check_data_host(config, plugins.data)
        plugins.data.check(config.base_dir, "data")
    model_dir, hub_model = None, None
    if config.model.path is not None:
        model_dir, hub_model = resolve_model_path(config)
        modeling.check_model_dir(model_dir)
    else:
        if config.model.revision is not None:
            raise ConfigError("model.revision", "applies to a Hugging Face Hub id in model.path only, not to model.source")
        source = registry.get("model_source", config.model.source, "model.source")
        if source.task != task:
            raise ConfigError("model.task", f"model source '{source.name}' is a {source.task} model, but model.task is {task}")
        if materialize:
            model_dir = materialize_source(registry, config.model.source)
    check_exporters(plugins.exporters, ExportCheck(task, plugins.quantizer, plugins.adapter, model_dir), registry)
    if plugins.evaluators:  # issue 14: the eval section, checked before anything trains
        from qlora_plugins.core.evaluation import check_evaluators

        check_evaluators(plugins.evaluators, task, config.base_dir, registry, [f"eval[{i}]" for i in range(len(plugins.evaluators))])
    return Checked(config, plugins, model_dir, hub_model)


def resolve_model_path(config: Config, weights: bool = True) -> tuple[Path, HubModel | None]:
    """``model.path`` as a directory: a local one as it is; a Hub id (``org/name`` that does
    not exist locally) through the Hugging Face cache, downloaded unless offline (core/hub.py)."""
    value = config.model.path or ""
    hub_id = is_hub_id(value, config.base_dir)
    check_revision(config.model.revision, value, hub_id)
    if not hub_id:
        return config.resolve_path(value), None
    found = resolve_hub(value, config.model.revision, weights=weights)
    return found.path, found


def check_data_host(config: Config, data: Any) -> None:
    """Refuse, before anything is loaded, host data options that do not fit the run: packing or
    mixing for classification, packing for a format without ``max_length``."""
    host, task = config.data_host, config.model.task
    if host.packing and task != "causal_lm":
        raise ConfigError("data.packing", f"packs token sequences for causal_lm; model.task is {task} (one label per example)")
    if host.packing and not isinstance(getattr(data.options, "max_length", None), int):
        raise ConfigError("data.packing", f"needs a max_length (the packed sequence length); data format '{data.name}' has none")
    if host.sources and task != "causal_lm":
        raise ConfigError(
            "data.sources", f"mixes causal_lm data; model.task is {task} (each file would number its class labels on its own)"
        )


def check_exporters(exporters: list, context: ExportCheck, registry: Any, paths: list[str] | None = None) -> None:
    """Each exporter's :meth:`Exporter.check`, before anything is loaded or trained; anything but
    an input error is a fault of the exporter and names it."""
    for i, exporter in enumerate(exporters):
        where = paths[i] if paths else f"export[{i}]"
        with plugin_check(registry, exporter, where):
            exporter.check(attrs.evolve(context, config_path=where))


def _scheduler(name: str, optimizer: Any, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _check_resume(out: Path, resolved: dict) -> None:
    """Refuse to resume into something that is not a run, or with a result-changing config."""
    import yaml

    if not (out / RUN_MARKER).is_file() or not (out / "config.yaml").is_file():
        raise QloraError(f"{option('resume')}: {out} is not a qlora run directory (no {RUN_MARKER} / config.yaml)")
    if not is_run_marker(out / RUN_MARKER):
        raise QloraError(f"{option('resume')}: {out} is not a qlora run directory (its {RUN_MARKER} was not written by qlora-plugins)")
    try:
        old = load_yaml((out / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, QloraError) as exc:
        raise QloraError(f"{option('resume')}: cannot read {out / 'config.yaml'}: {_first_line(exc)}") from None
    if not isinstance(old, dict):
        raise QloraError(f"{option('resume')}: {out / 'config.yaml'} is not a run config")
    changes = config_changes(old, resolved)
    if changes:
        raise ConfigError(option("resume"), "the config changed in ways that would change the result: " + "; ".join(changes))


def run_inputs(config: Config, plugins: ResolvedPlugins, model_dir: Path | None) -> list[tuple[str, Path | None]]:
    """What a run reads: a directory holding one of these is never replaced (``--force``)."""
    inputs: list[tuple[str, Path | None]] = [("the config file", config.source), ("model.path", model_dir)]
    if plugins.data is not None:
        inputs += [("the data", path) for path in plugins.data.input_paths(config.base_dir)]
    for evaluator in plugins.evaluators:
        inputs += [(f"evaluator '{evaluator.name}'", path) for path in evaluator.input_paths(config.base_dir)]
    return inputs


def check_output(out: Path, inputs: list[tuple[str, Path | None]], force: bool, resume: bool) -> None:
    """Before anything loads: refuse an output the run may not write into or replace."""
    if resume:
        if out.exists() and not out.is_dir():
            raise QloraError(f"{option('output')}: {out} exists and is not a directory")
        if out.exists():
            check_no_links(out, option("resume"))
        return
    check_run_output(out, force, inputs)


def _marker(report: RunReport, status: str, signal: str | None = None) -> dict:
    marker = {"tool": "qlora-plugins", "config": report.config, "status": status}
    if signal:
        marker["signal"] = signal
    return marker


def _failure(exc: BaseException) -> str:
    """How a failure reads in run.json: the one-line message of an input error, the exception's
    type too for anything else (``SystemExit: 0`` rather than ``0``)."""
    text = _first_line(exc)
    return (text if isinstance(exc, QloraError) else f"{type(exc).__name__}: {text}")[:500]


def _checkpoint_finished_training(out: Path, state: TrainState, save: Callable[[TrainState], Any], log: Log) -> None:
    """Interrupted after training (saving the adapter, exporting): checkpoint the last step, so
    that ``--resume`` goes straight to the exports instead of training again."""
    found = list_checkpoints(out)
    if state.step > 0 and not (found and found[-1].name.endswith(f"{state.step:08d}")):
        with contextlib.suppress(QloraError):
            save(state)
            log(f"Interrupted after training: checkpoint of step {state.step} saved; continue with {option('resume')}")


def _restore_previous(out: Path, aside: Path | None, log: Log) -> None:
    """After a failed ``--force`` run: put the replaced run back when the new one left nothing to
    resume; otherwise keep both and say where the previous one is."""
    import shutil

    if aside is None:
        return
    if list_checkpoints(out):
        log(f"The replaced run is kept in {aside} until this run completes (continue it with {option('resume')}: {out})")
        return
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.rename(aside, out)
    except OSError:
        log(f"The replaced run is kept in {aside}")


def check_takes_position_ids(model: Any) -> None:
    """Packing restarts the positions at every example: refuse a model whose forward takes no
    ``position_ids`` (it would number a pack's tokens 0..n and the examples would differ from
    their unpacked selves)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return
    if "position_ids" not in parameters:
        raise ConfigError("data.packing", f"model type {type(base).__name__} takes no position_ids, so packed examples cannot restart them")


def packed_collator(model: Any, device: str, pad_id: int | None) -> Callable[[list[dict]], dict]:
    """The collator of packed sequences for ``model``: one row without padding for a
    flash-attention model on CUDA, else padded rows with the 4-D block-diagonal mask."""
    if packed_attention(model, device) == "varlen":
        return collate_varlen
    dtype, pad = compute_dtype(model), pad_id if pad_id is not None else 0
    return lambda packs: collate_packed(packs, pad, dtype)


def data_report(prepared: "Prepared") -> dict:
    """report.json's ``data``: the format, packing figures and each mixed source's share."""
    plugins, splits = prepared.checked.plugins, prepared.splits
    if plugins.data is None or splits is None:
        return {}
    out: dict = {"format": plugins.data.name, "packing": prepared.packing.to_dict() if prepared.packing else None}
    if getattr(splits, "sources", None):
        out["sources"] = splits.sources
    return out


# --- what the stages hand each other -------------------------------------------------------


@attrs.define
class Prepared:
    """After ``prepare``: the checked config, where the run goes, the device, the tokenizer, the
    tokenized data (None when not training) and the resolved config written to config.yaml."""

    checked: Checked
    out: Path
    device: str
    tokenizer: Any
    splits: DataSplits | None
    resolved: dict
    inputs: list
    notes: list[str] = attrs.field(factory=list)
    num_labels: int | None = None
    packs: list | None = None
    packing: PackingStats | None = None


@attrs.define
class Loaded:
    """After ``load``: the base model (quantized by the quantizer), how it was requested, its
    footprint, and the time and peak memory of loading."""

    model: Any
    request: ModelRequest
    footprint: Any
    load_seconds: float
    load_peak_rss_bytes: int


@attrs.define
class Attached:
    """After ``attach``: the model with the adapter, its trainable parameters and the counts."""

    model: Any
    params: list
    parameters: dict


@attrs.define
class RunDirectory:
    """The opened run directory; ``aside`` is where ``--force`` moved the run it replaces."""

    path: Path
    aside: Path | None = None
    resumed: bool = False


@attrs.define
class Trained:
    """After ``train``: the loop's result (None when training is off), the step resumed from,
    the training time and the optimizer notes."""

    result: TrainResult | None = None
    resumed_from: int | None = None
    train_seconds: float | None = None
    notes: list[str] = attrs.field(factory=list)


class Pipeline:
    """One run of a config, stage by stage (see the module docstring).

    :param config: the parsed config.
    :param registry: the plugin registry.
    :param output_dir: the run directory.
    :param force: replace a previous run in ``output_dir`` (docs/security.md says what may be).
    :param resume: continue the run in ``output_dir`` from its newest intact checkpoint.
    :param log: where progress lines go.
    :param progress: show a progress bar while training.
    """

    stages = ("check", "prepare", "load", "attach", "open_run_dir", "train", "save_and_export", "evaluate", "finish")
    #: Whether this process writes the run directory (a distributed run's other ranks do not).
    writes_run_dir = True

    def __init__(
        self,
        config: Config,
        registry: Any,
        output_dir: Path,
        *,
        force: bool = False,
        resume: bool = False,
        log: Log = lambda m: None,
        progress: bool = True,
    ) -> None:
        self.config, self.registry, self.output_dir = config, registry, Path(output_dir)
        self.force, self.resume, self.log, self.progress = force, resume, spelled_log(log), progress
        self._interrupt_save: tuple[TrainState, Callable[[TrainState], Any]] | None = None

    # --- stages that write nothing ---------------------------------------------------------

    def check(self) -> Checked:
        """Plugins, files, the model source, the exporters' checks (materializes a model source)."""
        return check(self.config, self.registry, materialize=True)

    def prepare(self, checked: Checked) -> Prepared:
        """Output checks, device, threads and seed, tokenizer, data; the resolved config."""
        import torch

        config, plugins, model_dir = checked.config, checked.plugins, checked.model_dir
        train_cfg = config.train
        device = modeling.choose_device(train_cfg.device)
        out = self.output_dir.resolve()
        if model_dir is not None and (out == model_dir.resolve() or model_dir.resolve() in out.parents):
            raise ConfigError(option("output"), f"{out} is inside the model directory {model_dir}; choose another output")
        inputs = run_inputs(config, plugins, model_dir)
        if checked.hub is not None:  # the whole cached repository (blobs, refs, snapshots) is an input
            cached = repo_cache_dir(checked.hub)
            if out == cached.resolve() or cached.resolve() in out.parents:
                raise ConfigError(
                    option("output"), f"{out} is inside the Hugging Face cache of {checked.hub.repo_id} ({cached}); choose another output"
                )
            inputs.append(("model.path (the Hugging Face cache)", cached))
        check_output(out, inputs, self.force, self.resume)
        if train_cfg.threads:  # tiny models: one thread avoids OpenMP spin-waits on a busy machine
            torch.set_num_threads(train_cfg.threads)
        torch.manual_seed(train_cfg.seed)
        tokenizer = modeling.load_tokenizer(model_dir, config.model.trust_remote_code)
        splits, notes = None, []
        if train_cfg.enabled:
            self.log(f"Loading data with '{plugins.data.name}'")
            with progress.current().stage("data", unit="example") as stage:
                splits = plugins.data.load(DataContext(tokenizer, config.model.task, train_cfg.seed, config.base_dir, "data"))
                stage.update(len(splits.train) + len(splits.eval))
            tokenized = getattr(splits.train, "tokenized", None)
            if tokenized is not None and hasattr(tokenized, "describe"):
                self.log(tokenized.describe())
            if len(splits.train) == 0:
                raise QloraError("data: the training split is empty")
            if config.model.task == "causal_lm" and not any(
                label != IGNORE_INDEX for example in splits.train for label in example["labels"]
            ):
                raise QloraError(f"data: no token of the training split is trained (every label is masked; data.name={plugins.data.name})")
            if getattr(splits, "dropped", 0):
                notes.append(
                    f"data: {splits.dropped} of {splits.rows} rows dropped (no response left to learn within "
                    f"data.max_length={getattr(plugins.data.options, 'max_length', '?')}, or an empty response)"
                )
                self.log(notes[-1])
        packs, packing = None, None
        if splits is not None and config.data_host.packing:
            packs, packing = pack_examples(splits.train, plugins.data.options.max_length, train_cfg.seed)
            self.log(
                f"Packed {packing.examples} examples into {packing.packs} sequences of {packing.max_length} tokens "
                f"({100 * packing.fill:.1f}% full)"
            )
        resolved = resolved_dict(config, plugins)
        if config.model.source:  # the resolved config names the materialized checkpoint (report.json keeps the source)
            resolved["model"]["path"], resolved["model"]["source"] = str(model_dir), None
        if checked.hub is not None:  # a Hub id stays one, pinned to the commit it resolved to
            resolved["model"]["path"], resolved["model"]["revision"] = checked.hub.repo_id, checked.hub.commit
        if self.resume:
            _check_resume(out, resolved)
        return Prepared(
            checked, out, device, tokenizer, splits, resolved, inputs, notes, splits.num_labels if splits else None, packs, packing
        )

    def load(self, prepared: Prepared) -> Loaded:
        """The base model, loaded (and quantized) by the quantizer."""
        checked = prepared.checked
        plugins, model_dir = checked.plugins, checked.model_dir
        self.log(f"Loading {model_dir} with quantizer '{plugins.quantizer.name}' on {prepared.device}")
        started = time.perf_counter()
        request = model_request(checked.config, model_dir, prepared.device, prepared.num_labels)
        limit_heap_fragmentation()  # for every run: freed activations go back to the OS (streaming.py)
        total = sum(f.stat().st_size for f in modeling.safetensors_files(model_dir)) or None
        with progress.current().stage("load", total=total, unit="B"):
            model = load_base(plugins, request, prepared.tokenizer, self.registry)
        footprint = plugins.quantizer.footprint(model)
        return Loaded(model, request, footprint, round(time.perf_counter() - started, 3), peak_rss_bytes())

    def attach(self, prepared: Prepared, loaded: Loaded, saved_adapter: Path | None = None) -> Attached:
        """Freeze the base, turn on gradient checkpointing when training, attach the adapter: a
        new one, or the one saved in ``saved_adapter`` (``qlora export``)."""
        config, plugins = prepared.checked.config, prepared.checked.plugins
        model = loaded.model
        training = config.train.enabled and saved_adapter is None
        prepare_for_kbit_training(model, config.train.gradient_checkpointing and training)
        request = loaded.request
        if request.frozen_dtype is not None:
            from qlora_plugins.core.frozen import keep_frozen_16bit

            keep_frozen_16bit(model, request.frozen_dtype, request.dtype)
        context = AdapterContext(task=config.model.task, quantized=loaded.footprint.quantized_params > 0)
        if saved_adapter is not None:
            model = plugins.adapter.load(model, saved_adapter, context)
            model.eval()
            return Attached(model, [], parameter_report(model, loaded.footprint))
        model = plugins.adapter.attach(model, context)
        params = trainable_parameters(model)
        if request.frozen_dtype is not None and any(p.dtype == request.frozen_dtype for p in params):
            raise ConfigError(
                "model.frozen_dtype",
                f"adapter '{plugins.adapter.name}' trains weights kept in "
                f"{config.model.frozen_dtype}; use it only with adapters that keep the base frozen",
            )
        parameters = parameter_report(model, loaded.footprint)
        if config.data_host.packing:
            check_takes_position_ids(model)
        if not params:
            raise TrainingError("adapter: the configuration leaves nothing trainable (check adapter.target_modules)")
        return Attached(model, params, parameters)

    # --- stages that write the run directory --------------------------------------------------

    def open_run_dir(self, prepared: Prepared) -> RunDirectory:
        """Create (or, with ``--force``, replace; with ``--resume``, reopen) the run directory."""
        out = prepared.out
        if self.resume:
            check_no_links(out, option("resume"))
            remove_stale_temporaries(out)
            return RunDirectory(out, None, True)
        return RunDirectory(out, prepare_run_dir(out, self.force, prepared.inputs), False)

    def open_trackers(self, prepared: Prepared, run_dir: RunDirectory, resumed_step: int | None) -> Trackers:
        """The ``track`` section's trackers, opened (none on a process that does not write the
        metrics, see :func:`~qlora_plugins.core.tracking.is_metrics_process`)."""
        plugins = prepared.checked.plugins
        chosen = plugins.trackers if self.writes_run_dir and is_metrics_process() else []

        def describe(tracker: Any) -> str:
            return self.registry.registration("tracker", tracker.name).source.describe()

        return Trackers(chosen, describe, self.log).open(run_dir.path, prepared.resolved, resumed_step)

    def train(self, prepared: Prepared, attached: Attached, run_dir: RunDirectory, meta: dict) -> Trained:
        """The training loop with checkpoints (restored from the newest intact one on resume);
        metrics go to the trackers (metrics.jsonl and the ``track`` section's). With training
        off, the trackers are opened and closed (an empty metrics.jsonl)."""
        import torch

        config, plugins = prepared.checked.config, prepared.checked.plugins
        train_cfg, out, device = config.train, run_dir.path, prepared.device
        if not train_cfg.enabled:
            trackers = self.open_trackers(prepared, run_dir, None)
            trackers.close("completed")
            return Trained(notes=list(trackers.warnings))
        splits, model, trained = prepared.splits, attached.model, Trained()
        train_data, collate_fn = splits.train, None
        if prepared.packs is not None:
            train_data, collate_fn = prepared.packs, packed_collator(model, device, prepared.tokenizer.pad_token_id)
        steps = total_steps(train_cfg, len(train_data))
        trainer, params = self.distribute(prepared, attached)
        optimizer = plugins.optimizer.create(params, torch.device(device))
        note = plugins.optimizer.runtime_note(torch.device(device))
        if note:
            trained.notes.append(note)
            self.log(note)
        scheduler = _scheduler(train_cfg.lr_scheduler, optimizer, train_cfg.warmup_steps, steps)
        state = TrainState()
        if run_dir.resumed:
            checkpoint, restored = self.restore_checkpoint(out, model, optimizer, scheduler)
            if restored is not None:
                state, trained.resumed_from = restored, restored.step
                self.log(f"Resuming from {checkpoint} (step {state.step})")

        def save(at: TrainState) -> None:
            self.save_checkpoint(out, model, optimizer, scheduler, at, meta, train_cfg.keep_checkpoints)

        def on_step_end(at: TrainState) -> None:
            if train_cfg.checkpoint_every and at.step % train_cfg.checkpoint_every == 0:
                save(at)

        def on_interrupt(at: TrainState) -> None:
            if at.step > 0:
                save(at)
                self.log(f"Interrupted: checkpoint of step {at.step} saved; continue with {option('resume')}")

        packed = f" in {len(train_data)} packed sequences" if prepared.packs is not None else ""
        self.log(f"Training {attached.parameters['trainable']:,} parameters for {steps} steps on {len(splits.train)} examples{packed}")
        trackers = self.open_trackers(prepared, run_dir, state.step if run_dir.resumed else None)
        started, status = time.perf_counter(), "failed"
        try:
            with progress.current().stage("train", total=steps, unit="step", initial=state.step) as stage:
                trained.result = self.loop_class(
                    trainer,
                    optimizer,
                    scheduler,
                    train_cfg,
                    train_data,
                    splits.eval,
                    prepared.tokenizer.pad_token_id,
                    config.model.task,
                    device,
                    steps,
                    state=state,
                    on_record=trackers.log,
                    on_step_end=on_step_end,
                    on_interrupt=on_interrupt,
                    progress=stage,
                    collate_fn=collate_fn,
                ).run()
            status = "completed"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            trackers.close(status)
            trained.notes += trackers.warnings
        trained.train_seconds = round(time.perf_counter() - started, 3)
        self._interrupt_save = (state, save)  # an interrupt from here on keeps the finished training
        return trained

    # --- what a distributed run replaces (core/distributed.py) ------------------------------------

    #: The training loop class (a distributed run shards each batch across the ranks).
    loop_class: type = TrainLoop

    def distribute(self, prepared: Prepared, attached: Attached) -> tuple[Any, list]:
        """The model the loop trains (wrapped for DDP, sharded for FSDP) and its trainable
        parameters, for the optimizer; one process trains the attached model itself."""
        return attached.model, attached.params

    def save_checkpoint(self, out: Path, model: Any, optimizer: Any, scheduler: Any, at: TrainState, meta: dict, keep: int) -> None:
        """Write the checkpoint of ``at`` (atomic; see core/checkpointing.py)."""
        save_training_checkpoint(out, model, optimizer, scheduler, at, meta, keep)

    def restore_checkpoint(self, out: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[Path | None, TrainState | None]:
        """Restore the newest intact checkpoint of ``out`` into the model, optimizer and scheduler."""
        return restore_latest(out, model, optimizer, scheduler, self.log)

    def save_and_export(self, prepared: Prepared, attached: Attached, run_dir: RunDirectory) -> tuple[dict, float]:
        """Save the adapter to adapter/, then run every exporter into exports/ (verified)."""
        from safetensors import SafetensorError

        checked = prepared.checked
        plugins, out = checked.plugins, run_dir.path
        attached.model.eval()
        try:
            with atomic_directory(out / "adapter", force=True) as tmp:
                plugins.adapter.save(attached.model, tmp)
        except (OSError, SafetensorError) as exc:
            raise QloraError(f"cannot save the adapter to {out / 'adapter'}: {_first_line(exc)}") from None
        splits = prepared.splits
        probe = list(splits.eval[:8] or splits.train[:8]) if splits else []
        request = model_request(checked.config, checked.model_dir, prepared.device, prepared.num_labels)
        context = ExportContext(
            attached.model,
            prepared.tokenizer,
            checked.model_dir,
            checked.config.model.task,
            plugins.quantizer,
            plugins.adapter,
            prepared.resolved,
            request,
            probe,
        )
        started = time.perf_counter()
        exports = run_exports(context, plugins.exporters, out / "exports", self.registry, self.force or self.resume, self.log)
        return exports, round(time.perf_counter() - started, 3)

    def evaluate(self, prepared: Prepared, attached: Attached) -> dict:
        """The ``eval`` section's evaluators on the base model (the adapter disabled, or the
        base loaded again when the adapter cannot be disabled) and on the fine-tuned model,
        side by side (:mod:`qlora_plugins.core.evaluation`); ``{}`` without an ``eval`` section."""
        from qlora_plugins.core.evaluation import as_is, run_evaluators
        from qlora_plugins.core.inference import is_conversational
        from qlora_plugins.core.interfaces import EvalContext

        checked = prepared.checked
        evaluators = checked.plugins.evaluators
        if not evaluators:
            return {}
        config, model = checked.config, attached.model
        model.eval()

        @contextlib.contextmanager
        def base() -> Any:
            disable = getattr(model, "disable_adapter", None)
            if callable(disable):
                with disable():
                    yield model
                return
            request = model_request(config, checked.model_dir, prepared.device, prepared.num_labels)
            fresh = load_base(checked.plugins, request, prepared.tokenizer, self.registry)
            try:
                yield fresh
            finally:
                del fresh

        chat = is_conversational(prepared.resolved, self.registry)
        context = EvalContext(
            None, prepared.tokenizer, prepared.device, config.model.task, "fine_tuned", chat, config.base_dir, config.train.seed
        )
        paths = [f"eval[{i}]" for i in range(len(evaluators))]
        return run_evaluators(evaluators, [("base", base), ("fine_tuned", lambda: as_is(model))], context, self.registry, paths, self.log)

    def finish(self, report: RunReport, run_dir: RunDirectory) -> RunReport:
        """Loss plot, report.json and run.json (completed); the runs ``--force`` replaced are
        deleted only now."""
        out = run_dir.path
        checked_name = report.model.get("path") or ""
        title = f"{Path(checked_name).name}: {report.plugins['quantizer']['name']} + {report.plugins['adapter']['name']}"
        if plot_loss(out / "metrics.jsonl", out / "loss.png", title):
            report.loss_plot = str(out / "loss.png")
        report.status = "completed"
        atomic_write_json(out / "report.json", report.to_dict())
        atomic_write_json(out / RUN_MARKER, _marker(report, "completed"))
        for old in ([run_dir.aside] if run_dir.aside is not None else []) + asides_of(out):
            remove_aside(old)
        return report

    # --- the whole run ---------------------------------------------------------------------------

    def run(self) -> RunReport:
        """All stages in order; a failure or interrupt after the run directory is open marks it in
        run.json, keeps a finished training as a checkpoint and puts back a run ``--force`` was
        replacing when the new one left nothing to resume."""
        with progress.use(progress.Progress.for_terminal(self.progress, self.log)):
            return self._run()

    def _run(self) -> RunReport:
        import torch

        started = time.perf_counter()
        checked = self.check()
        prepared = self.prepare(checked)
        config, plugins = checked.config, checked.plugins
        report = RunReport.start(
            prepared.out, config, checked.model_dir, plugin_report(self.registry, plugins), versions(), prepared.device
        )
        if checked.hub is not None:
            report.model["hub"] = checked.hub.as_dict()
        report.notes += prepared.notes
        report.data = data_report(prepared)
        loaded = self.load(prepared)
        report.quantization = {
            "quantized_params": loaded.footprint.quantized_params,
            "quantized_bytes": loaded.footprint.quantized_bytes,
            "bits_per_param": loaded.footprint.bits_per_param,
            **plugins.quantizer.metadata(),
        }
        report.timings["load_s"] = loaded.load_seconds
        attached = self.attach(prepared, loaded)
        report.parameters = attached.parameters
        # everything a user can get wrong has been checked: only now is the run directory written
        run_dir = self.open_run_dir(prepared)
        try:
            if self.writes_run_dir:
                atomic_write_json(run_dir.path / RUN_MARKER, _marker(report, "running"))  # first: the marker makes the directory ours
                atomic_write_yaml(run_dir.path / "config.yaml", prepared.resolved)
            meta = {"config": prepared.resolved, "plugins": report.plugins, "versions": report.versions}
            trained = self.train(prepared, attached, run_dir, meta)
            report.notes += trained.notes
            if trained.result is not None:
                report.training = TrainingFigures.of(trained.result, prepared.splits, trained.resumed_from)
                report.timings["train_s"] = trained.train_seconds
            report.exports, report.timings["export_s"] = self.save_and_export(prepared, attached, run_dir)
            if plugins.evaluators:
                eval_started = time.perf_counter()
                report.evaluations = self.evaluate(prepared, attached)
                report.timings["eval_s"] = round(time.perf_counter() - eval_started, 3)
            report.memory = {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": loaded.load_peak_rss_bytes}
            if prepared.device == "cuda":
                report.memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            report.timings["total_s"] = round(time.perf_counter() - started, 3)
            return self.finish(report, run_dir)
        except BaseException as exc:
            self._record_failure(report, run_dir, exc)
            raise

    def _record_failure(self, report: RunReport, run_dir: RunDirectory, exc: BaseException) -> None:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {_failure(exc)}"
        with contextlib.suppress(QloraError):
            atomic_write_json(run_dir.path / RUN_MARKER, _marker(report, status, "SIGTERM" if isinstance(exc, Terminated) else None))
        if isinstance(exc, KeyboardInterrupt) and self._interrupt_save is not None:
            _checkpoint_finished_training(run_dir.path, *self._interrupt_save, self.log)
        _restore_previous(run_dir.path, run_dir.aside, self.log)


def run(
    config: Config,
    registry: Any,
    output_dir: Path,
    force: bool = False,
    log: Log = lambda m: None,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Run the whole pipeline into ``output_dir`` and return the report as a mapping (what
    report.json holds). With ``resume``, continue the run in ``output_dir`` from its newest
    intact checkpoint."""
    return Pipeline(config, registry, output_dir, force=force, resume=resume, log=log, progress=progress).run().to_dict()
