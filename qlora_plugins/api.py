"""What programmatic users need: read a config, build a registry, check, run and export.

::

    from qlora_plugins.api import create_registry, load_config, run

    report = run(load_config("examples/quickstart.yaml", ["train.max_steps=10"]), create_registry(), Path("runs/x"))

``Pipeline`` runs the same stages one by one (subclass it to wrap a stage); ``export_run`` is
``qlora export``. Errors are :mod:`qlora_plugins.errors` exceptions.
"""

from qlora_plugins.core.config import (
    Config,
    ResolvedPlugins,
    apply_overrides,
    load_config,
    load_yaml,
    parse_config,
    read_config_file,
    recorded_plugin_options,
    resolve_plugins,
    resolved_dict,
)
from qlora_plugins.core.exporting import export_run, load_run
from qlora_plugins.core.pipeline import (
    Attached,
    Checked,
    Loaded,
    Pipeline,
    Prepared,
    RunDirectory,
    Trained,
    check,
    run,
)
from qlora_plugins.core.registry import Registry, create_registry
from qlora_plugins.core.run_report import RunReport, TrainingFigures
from qlora_plugins.core.rundir import atomic_write_json, dumps
from qlora_plugins.core.sources import cache_home, materialize_source
from qlora_plugins.core.training import TrainLoop, TrainState, step_loss

__all__ = [
    "Attached",
    "Checked",
    "Config",
    "Loaded",
    "Pipeline",
    "Prepared",
    "Registry",
    "ResolvedPlugins",
    "RunDirectory",
    "RunReport",
    "Trained",
    "TrainLoop",
    "TrainState",
    "TrainingFigures",
    "apply_overrides",
    "recorded_plugin_options",
    "atomic_write_json",
    "cache_home",
    "check",
    "create_registry",
    "dumps",
    "export_run",
    "load_config",
    "load_run",
    "load_yaml",
    "materialize_source",
    "parse_config",
    "read_config_file",
    "resolve_plugins",
    "resolved_dict",
    "run",
    "step_loss",
]
