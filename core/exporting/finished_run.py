"""``qlora export``: load a finished run back (its ``config.yaml`` and ``adapter/``) through its own
plugins and run exporters on it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from qlora_plugins.core.config import recorded_plugin_options
from qlora_plugins.core.errors import ExportError, ModelError, OutputExistsError, QloraError, UnsafeOutputError, short_text
from qlora_plugins.core.exporting.fidelity import PROBE_MAX_EXAMPLES
from qlora_plugins.core.exporting.paths import check_export_target, export_directory
from qlora_plugins.core.exporting.runner import run_exports
from qlora_plugins.core.interfaces import ExportContext
from qlora_plugins.core.rundir import atomic_write_json
from qlora_plugins.core.safety import check_holds_no_input, check_no_link_between, check_no_links
from qlora_plugins.core.wording import option, spelled_log

Log = Callable[[str], None]


ADAPTER_DIR = "adapter"


def _read_run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ExportError(f"RUN_DIR: {run_dir} is not a directory")
    if not path.is_file():
        raise ExportError(f"RUN_DIR: {run_dir} is not a qlora run directory (no config.yaml)")
    from qlora_plugins.core.config import load_yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, QloraError) as exc:
        raise ExportError(f"{path}: cannot read the run's config: {short_text(str(exc), 300)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ExportError(f"{path}: not a run config (no model section)")
    return data


def _check_adapter_dir(run_dir: Path) -> Path:
    adapter_dir = run_dir / ADAPTER_DIR
    if not adapter_dir.is_dir() or not any(adapter_dir.iterdir()):
        raise ExportError(f"{run_dir} has no trained adapter ({ADAPTER_DIR}/ is missing or empty); did the run finish?")
    from qlora_plugins.core.checkpoint_format import check_safetensors

    weights = sorted(adapter_dir.glob("*.safetensors"))
    for path in weights:
        try:
            check_safetensors(path)
        except ModelError as exc:
            raise ExportError(f"adapter: {exc}") from None
    return adapter_dir


def _model_type(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    return None


def _check_adapter_base(adapter: Any, adapter_dir: Path, model_dir: Path) -> None:
    """Refuse an adapter trained on a model of another type than ``model_dir``'s (as far as the
    adapter plugin records its base model: :meth:`Adapter.saved_info`)."""
    recorded = adapter.saved_info(adapter_dir).base_model
    if recorded and Path(recorded).is_dir() and Path(recorded).resolve() != Path(model_dir).resolve():
        trained, now = _model_type(Path(recorded)), _model_type(model_dir)
        if trained and now and trained != now:
            raise ExportError(
                f"the adapter in {adapter_dir} was trained on a {trained} model ({recorded}), but the run's base model {model_dir} is a {now} model"
            )


class FinishedRun:
    """The pipeline's stages applied to a finished run, for ``qlora export``: ``check`` (plugins
    and files), ``prepare`` without output checks (the run directory is read, not written) and
    with the data only for probe examples, ``load``, then ``attach`` of the saved adapter."""

    def __init__(self, config: Any, registry: Any, run_dir: Path, resolved: dict, adapter_dir: Path, log: Log) -> None:
        from qlora_plugins.core.pipeline import Pipeline

        self.pipeline = Pipeline(config, registry, run_dir, log=log, progress=False)
        self.resolved, self.adapter_dir, self.log = resolved, adapter_dir, self.pipeline.log

    def prepare(self, checked: Any) -> Any:
        from qlora_plugins.core import modeling
        from qlora_plugins.core.interfaces import DataContext
        from qlora_plugins.core.pipeline import Prepared

        config, plugins, model_dir = checked.config, checked.plugins, checked.model_dir
        _check_adapter_base(plugins.adapter, self.adapter_dir, model_dir)
        device = modeling.choose_device(config.train.device)
        tokenizer = modeling.load_tokenizer(model_dir, config.model.trust_remote_code)
        splits = None
        if plugins.data is not None:
            try:
                splits = plugins.data.load(DataContext(tokenizer, config.model.task, config.train.seed, config.base_dir, "data"))
            except QloraError as exc:
                self.log(f"Probe: the run's data is not usable ({exc}); comparing on a built-in text")
        num_labels = config.model.num_labels or (splits.num_labels if splits else None)
        if config.model.task == "seq_cls" and num_labels is None:
            num_labels = plugins.adapter.saved_info(self.adapter_dir).num_labels
        return Prepared(checked, self.pipeline.output_dir, device, tokenizer, splits, self.resolved, [], [], num_labels)

    def context(self) -> ExportContext:
        """The trained model rebuilt from the run, as an :class:`ExportContext`."""
        pipeline = self.pipeline
        checked = pipeline.check()
        prepared = self.prepare(checked)
        model_dir = checked.model_dir
        pipeline.log(f"Loading {model_dir} with quantizer '{checked.plugins.quantizer.name}' and the adapter in {self.adapter_dir}")
        loaded = pipeline.load(prepared)
        try:
            attached = pipeline.attach(prepared, loaded, saved_adapter=self.adapter_dir)
        except QloraError:
            raise
        except Exception as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            detail = next((line for line in lines if "size mismatch" in line or "not found" in line), lines[0])
            raise ExportError(
                f"the adapter in {self.adapter_dir} does not match the base model {model_dir} ({_model_type(model_dir)}): {detail[:300]}"
            ) from None
        splits = prepared.splits
        probe = list(splits.eval[:PROBE_MAX_EXAMPLES] or splits.train[:PROBE_MAX_EXAMPLES]) if splits else []
        plugins = checked.plugins
        return ExportContext(
            attached.model,
            prepared.tokenizer,
            model_dir,
            checked.config.model.task,
            plugins.quantizer,
            plugins.adapter,
            self.resolved,
            loaded.request,
            probe,
        )


def finished_config(data: dict, config_file: Path, with_data: bool = True) -> Any:
    """The parsed config of a finished run (its ``config.yaml`` as ``data``) for loading it back:
    training off, no exporters, no evaluators, the materialized model path (or the source when
    that path is gone) and the data only when ``with_data`` and its file is still there."""
    import copy

    from qlora_plugins.core.config import parse_config

    parse = copy.deepcopy(data)
    model = dict(parse["model"])
    if model.get("path") and model.get("source"):
        if not Path(model["path"]).is_dir():
            model.pop("path")
        else:
            model.pop("source")
    parse["model"] = model
    parse["train"] = {**(parse.get("train") or {}), "enabled": False}
    section = parse.get("data") if isinstance(parse.get("data"), dict) else {}
    sources = section.get("sources") if isinstance(section.get("sources"), list) else None
    data_paths = [s.get("path") if isinstance(s, dict) else None for s in sources] if sources else [section.get("path")]
    if not with_data or not all(isinstance(p, str) and p and Path(p).is_file() for p in data_paths):
        parse.pop("data", None)
    parse["export"] = []
    parse.pop("eval", None)
    return parse_config(parse, config_file)


def load_run(run_dir: Path, registry: Any, log: Log = lambda m: None, with_data: bool = True) -> ExportContext:
    """Load a finished run (``RUN_DIR/config.yaml`` + ``RUN_DIR/adapter``) back into the trained
    model through the same plugins and pipeline stages; the probe examples are the run's
    held-out examples when its data file is still there (and ``with_data``: ``qlora generate``
    does not tokenize the training data).

    :raises ExportError: no adapter, an adapter that does not fit the base, corrupt files.
    """
    import copy

    run_dir = Path(run_dir)
    data = _read_run_config(run_dir)
    adapter_dir = _check_adapter_dir(run_dir)
    config = finished_config(data, run_dir / "config.yaml", with_data)
    return FinishedRun(config, registry, run_dir, copy.deepcopy(data), adapter_dir, log).context()


def load_saved_adapter(run_config: dict, adapter_dir: Path, registry: Any, log: Log = lambda m: None) -> ExportContext:
    """Like :func:`load_run` for an adapter saved elsewhere (an adapter export), given the run
    config it was trained with (the export's ``manifest.json`` records it)."""
    import copy

    adapter_dir = Path(adapter_dir)
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise ExportError(f"{adapter_dir}: the manifest records no run config (no model section)")
    config = finished_config(run_config, adapter_dir / "manifest.json", with_data=False)
    return FinishedRun(config, registry, adapter_dir, copy.deepcopy(run_config), adapter_dir, log).context()


def export_run(
    run_dir: Path,
    names: Sequence[str],
    registry: Any,
    output: Path | None = None,
    options: Sequence[str] = (),
    force: bool = False,
    log: Log = lambda m: None,
) -> dict:
    """``qlora export``: run exporters ``names`` on the finished run in ``run_dir``.

    The artifact of a single exporter goes to ``output`` (default ``RUN_DIR/exports/<name>``);
    with several, to ``output/<name>``. Each exporter starts from its options in the run's
    config (if listed there), updated with ``options`` (``KEY=VALUE``, values YAML).
    ``NAME.KEY=VALUE`` applies to exporter NAME only. Names, options and output directories are
    checked before anything is loaded.
    """
    run_dir, log = Path(run_dir), spelled_log(log)
    run_config = _read_run_config(run_dir)
    check_no_links(run_dir.resolve(), "RUN_DIR")
    if not names:
        raise ExportError(f"name at least one exporter ({option('exporter')} NAME)")
    exporters = []
    for name in names:
        registry.get("exporter", name, option("exporter"))
        exporters.append(
            registry.create(
                "exporter", name, recorded_plugin_options(run_config, "export", name, options, names), f"{option('exporter')} {name}"
            )
        )
    if output is None:
        outputs = [export_directory(e, run_dir / "exports") for e in exporters]
    elif len(exporters) == 1:
        outputs = [Path(output)]
    else:
        outputs = [export_directory(e, Path(output)) for e in exporters]
    run_res = run_dir.resolve()
    inputs = [("RUN_DIR", run_res)] + _run_inputs(run_config, run_res)
    for out in outputs:
        res = out.resolve() if not out.is_symlink() else out.absolute()
        if res == run_res or res in run_res.parents or run_res / ADAPTER_DIR == res or (run_res / ADAPTER_DIR) in res.parents:
            raise ExportError(f"{option('output')}: {out} would replace the run directory or its adapter; choose another directory")
        if run_res in res.parents:
            if run_res / "exports" not in res.parents:
                raise ExportError(
                    f"{option('output')}: {out} is inside the run directory but not under its exports/; choose another directory"
                )
            check_no_link_between(run_res, res, option("output"))
        check_holds_no_input(res, inputs, option("output"))
        try:
            check_export_target(out, force)
        except (OutputExistsError, UnsafeOutputError) as exc:
            raise type(exc)(f"{option('output')}: {Exception.__str__(exc)}") from None
    _check_before_loading(run_config, exporters, registry)
    context = load_run(run_dir, registry, log)
    results = run_exports(context, exporters, run_dir / "exports", registry, force, log, outputs=outputs)
    _record_in_report(run_dir, results)
    return results


def _check_before_loading(run_config: dict, exporters: list, registry: Any) -> None:
    """The exporters' own checks (:meth:`Exporter.check`) against the run's plugins, before the
    model is loaded."""
    from qlora_plugins.core.config import parse_config
    from qlora_plugins.core.interfaces import ExportCheck
    from qlora_plugins.core.pipeline import check_exporters

    sections = {k: run_config[k] for k in ("model", "quantizer", "adapter") if isinstance(run_config.get(k), dict)}
    config = parse_config({**sections, "train": {"enabled": False}, "export": []}, None)
    quantizer = registry.create("quantizer", config.quantizer.name, config.quantizer.options, "quantizer")
    adapter = registry.create("adapter", config.adapter.name, config.adapter.options, "adapter")
    model = run_config.get("model") or {}
    base = Path(model["path"]) if isinstance(model.get("path"), str) else None
    check_exporters(
        exporters, ExportCheck(config.model.task, quantizer, adapter, base), registry, [f"{option('exporter')} {e.name}" for e in exporters]
    )


def _run_inputs(run_config: dict, run_dir: Path) -> list[tuple[str, Path | None]]:
    """The run's base model and data as recorded in its config (a ``--force`` export never
    replaces a directory holding them)."""
    found: list[tuple[str, Path | None]] = []
    model = run_config.get("model") if isinstance(run_config.get("model"), dict) else {}
    data = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    for label, value in (("the run's base model", model.get("path")), ("the run's data", data.get("path"))):
        if isinstance(value, str) and value:
            path = Path(value)
            found.append((label, path if path.is_absolute() else run_dir / path))
    return found


def _record_in_report(run_dir: Path, results: dict) -> None:
    """Add the exports to the run's report.json (when there is one)."""
    path = run_dir / "report.json"
    if not path.is_file():
        return
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(report, dict):
            report.setdefault("exports", {}).update(results)
            atomic_write_json(path, report)
