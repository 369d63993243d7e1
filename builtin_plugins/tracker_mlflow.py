"""Builtin tracker ``mlflow``: an MLflow run with the resolved config as parameters and every
numeric metric at its step. By default the store is a local file store in ``tracking/mlflow/`` of
the run directory (a ``file:`` URI, nothing leaves the machine); ``tracking_uri`` names another.
Needs ``mlflow`` (``pip install 'qlora-plugins[mlflow]'``); MLflow 3 keeps its file store
behind ``MLFLOW_ALLOW_FILE_STORE=true``, which the tracker sets (unless set) for a ``file:`` URI. A resumed run is a new MLflow run
tagged ``qlora.resumed_step``."""

from __future__ import annotations

import os
from typing import Any, Optional

import attrs

from qlora_plugins import Tracker, TrackerContext, hookimpl
from qlora_plugins.tracking import numeric_metrics

INSTALL = "pip install 'qlora-plugins[mlflow]'"
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"train.max_steps": "10", "export.0.name": "adapter", ...}`` (MLflow caps a value at 6000 characters)."""
    out: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            out.update(flat_params(value, f"{name}."))  # type: ignore[arg-type]
        else:
            out[name] = str(value)[:6000]
    return out


@attrs.define
class MlflowOptions:
    """``tracking_uri`` (default: a file store in the run directory), ``experiment`` and
    ``run_name`` (default: the run directory's name)."""

    tracking_uri: Optional[str] = None
    experiment: str = "qlora"
    run_name: Optional[str] = None


class MlflowTracker(Tracker):
    """An MLflow run (a local file store in the run directory by default)."""

    name = "mlflow"
    Options = MlflowOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._client: Any = None
        self._run_id: Optional[str] = None

    def open(self, context: TrackerContext) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError(f"{exc} ({INSTALL})") from None
        uri = self.options.tracking_uri or context.directory.resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store behind an opt-in (it is in maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.options.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(self.options.experiment)
        tags = {"qlora.run_dir": str(context.run_dir)}
        if context.resumed_step is not None:
            tags["qlora.resumed_step"] = str(context.resumed_step)
        run = client.create_run(experiment_id, run_name=self.options.run_name or context.run_name, tags=tags)
        self._client, self._run_id = client, run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flat_params(context.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self._run_id, params=params[i : i + 100])

    def log(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [Metric(key, value, now, step) for key, value in numeric_metrics(record).items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, status: str) -> None:
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, status=STATUS.get(status, "FAILED"))
        self._client = self._run_id = None


@hookimpl
def register_trackers(register):
    register(MlflowTracker)
