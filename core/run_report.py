"""The run report: a typed record of one run, assembled from the pipeline stages' results and
written as ``report.json`` (:meth:`RunReport.to_dict`; the keys are documented in the README's
"The run directory" table)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

import attrs


@attrs.define
class TrainingFigures:
    """What the training loop did: steps, losses, step times, examples, resumption."""

    steps: int
    first_loss: Optional[float]
    last_loss: Optional[float]
    eval_loss: Optional[float]
    eval_accuracy: Optional[float]
    median_step_time_s: Optional[float]
    mean_step_time_s: Optional[float]
    train_examples: int
    eval_examples: int
    data_rows: Optional[int]
    dropped_rows: int
    resumed_from_step: Optional[int]

    @classmethod
    def of(cls, result: Any, splits: Any, resumed_from: Optional[int]) -> "TrainingFigures":
        """The figures of a :class:`~qlora_plugins.core.training.TrainResult` on ``splits``."""
        times = result.step_times
        return cls(
            steps=result.steps,
            first_loss=result.first_loss,
            last_loss=result.last_loss,
            eval_loss=result.eval.get("eval_loss"),
            eval_accuracy=result.eval.get("eval_accuracy"),
            median_step_time_s=statistics.median(times) if times else None,
            mean_step_time_s=statistics.fmean(times) if times else None,
            train_examples=len(splits.train),
            eval_examples=len(splits.eval),
            data_rows=getattr(splits, "rows", None),
            dropped_rows=getattr(splits, "dropped", 0),
            resumed_from_step=resumed_from,
        )


@attrs.define
class RunReport:
    """Everything ``report.json`` records about a run.

    :param status: ``running`` until the run completes, then ``completed``.
    :param run_dir: the run directory.
    :param config: the config file the run was started from.
    :param model: path, source, task, dtype and trust_remote_code of the base model.
    :param plugins: name, distribution, version and options of each plugin used.
    :param versions: versions of Python and the libraries.
    :param device: ``cpu`` or ``cuda``.
    :param quantization: the quantizer's footprint and metadata.
    :param parameters: total, trainable and quantized parameter counts.
    :param training: the training figures (None when training is off).
    :param exports: facts and fidelity of each export, by exporter.
    :param memory: peak resident memory (and CUDA peak), during loading and overall.
    :param timings: seconds spent loading, training, exporting and in all.
    :param data: the data format, the packing figures (``data.packing``) and each mixed
        source's share of the training examples and tokens (``data.sources``).
    :param notes: lines worth reading (optimizer behaviour on this device, dropped rows...).
    :param loss_plot: the loss-curve PNG, when there was a loss to plot.
    :param evaluations: the ``eval`` section's figures, by evaluator: ``{"base": {...},
        "fine_tuned": {...}, "seconds": s}`` (left out of report.json when there is none).
    :param distributed: world size, strategy, backend and every rank's peak memory (and base
        weight bytes) of a run on several processes; empty for one process.
    """

    status: str
    run_dir: str
    config: Optional[str]
    model: dict
    plugins: dict
    versions: dict
    device: str
    quantization: dict = attrs.field(factory=dict)
    parameters: dict = attrs.field(factory=dict)
    training: Optional[TrainingFigures] = None
    exports: dict = attrs.field(factory=dict)
    memory: dict = attrs.field(factory=dict)
    timings: dict = attrs.field(factory=dict)
    data: dict = attrs.field(factory=dict)
    notes: list = attrs.field(factory=list)
    loss_plot: Optional[str] = None
    evaluations: dict = attrs.field(factory=dict)  # issue 14, generate/eval branch
    distributed: dict = attrs.field(factory=dict)

    @classmethod
    def start(cls, out: Path, config: Any, model_dir: Optional[Path], plugins: dict, versions: dict, device: str) -> "RunReport":
        """The report of a run about to load its model."""
        model = {
            "path": str(model_dir),
            "source": config.model.source,
            "task": config.model.task,
            "dtype": config.model.dtype,
            "trust_remote_code": config.model.trust_remote_code,
        }
        return cls("running", str(out), str(config.source) if config.source else None, model, plugins, versions, device)

    def to_dict(self) -> dict:
        """The mapping written as report.json (sections without content are left out)."""
        out = attrs.asdict(self, recurse=True)
        if self.training is None:
            out.pop("training")
        if self.loss_plot is None:
            out.pop("loss_plot")
        if not self.evaluations:
            out.pop("evaluations")
        if not self.distributed:
            out.pop("distributed")
        return out
