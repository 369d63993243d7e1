"""Builtin evaluator ``lm_eval``: EleutherAI's lm-evaluation-harness on our model (the optional
extra ``qlora-plugins[eval]``).

The model in memory (4-bit base + adapter, a merged export, the base with the adapter disabled)
is wrapped as an lm_eval ``HFLM``; tasks are local YAML task definitions (a file, or every
``*.yaml`` in a directory) whose ``dataset_kwargs.data_files`` point at local files, relative
paths resolved against the YAML file's directory, so nothing is downloaded. A task name that
lm_eval knows (``hellaswag``) works too where its dataset is in the local datasets cache.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import attrs

from qlora_plugins import EvalContext, Evaluator, hookimpl
from qlora_plugins.errors import EvaluationError, short_text
from qlora_plugins.options import in_range, positive

#: Task YAML files larger than this are refused.
MAX_TASK_BYTES = 1 << 20


@attrs.define
class LmEvalOptions:
    """``task``: a task YAML file, a directory of them, or a task name lm_eval knows; ``limit``:
    at most N documents per task; ``num_fewshot``: examples in each prompt; ``batch_size``."""

    task: str
    limit: Optional[int] = attrs.field(default=None, validator=positive)
    num_fewshot: Optional[int] = attrs.field(default=None, validator=in_range(0, 1000))
    batch_size: int = attrs.field(default=1, validator=in_range(1, 4096))


def _require_lm_eval(where: str) -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluationError(f"{where}: evaluator 'lm_eval' needs lm-evaluation-harness: pip install 'qlora-plugins[eval]'")


def _resolve_files(value: Any, base: Path) -> Any:
    """``data_files`` (a path, a list or a mapping of split to paths) with relative paths made
    absolute against ``base``."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)
    if isinstance(value, list):
        return [_resolve_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_files(v, base) for k, v in value.items()}
    return value


def task_configs(spec: str, base_dir: Path, where: str) -> list[Any]:
    """The tasks ``spec`` names: the config mappings of a YAML file or of each YAML file in a
    directory (local data files resolved), or the task name itself."""
    import yaml

    path = Path(base_dir) / Path(spec).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:
        raise EvaluationError(f"{where}: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None
    if not is_dir and not is_file:
        if spec.endswith((".yaml", ".yml")) or "/" in spec:
            raise EvaluationError(f"{where}: task file not found: {path}")
        return [spec]  # a task lm_eval knows by name
    files = sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml"))) if is_dir else [path]
    if not files:
        raise EvaluationError(f"{where}: {path} holds no task YAML files")
    configs = []
    for file in files:
        try:
            if file.stat().st_size > MAX_TASK_BYTES:
                raise EvaluationError(f"{where}: {file} is larger than {MAX_TASK_BYTES >> 20} MiB")
            config = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise EvaluationError(
                f"{where}: cannot read the task {file}: {short_text(str(exc).splitlines()[0] if str(exc) else '', 200)}"
            ) from None
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise EvaluationError(f"{where}: {file} is not an lm_eval task definition (no 'task' name)")
        kwargs = config.get("dataset_kwargs")
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            config["dataset_kwargs"] = {**kwargs, "data_files": _resolve_files(kwargs["data_files"], file.parent)}
            missing = [f for f in _flat(config["dataset_kwargs"]["data_files"]) if not Path(f).is_file()]
            if missing:
                raise EvaluationError(f"{where}: {file}: data file not found: {missing[0]}")
        configs.append(config)
    return configs


def _flat(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return []


def _figures(results: dict) -> dict:
    """lm_eval's ``results`` as flat figures: ``TASK/METRIC`` (``tiny_mc/acc``), the filter
    suffix dropped when it is ``none``."""
    out: dict[str, Any] = {}
    for task, metrics in sorted((results.get("results") or {}).items()):
        for key, value in sorted(metrics.items()):
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" + ("" if filt in ("", "none") else f"[{filt}]")
            out[name] = None if isinstance(value, float) and math.isnan(value) else value
    for task, samples in sorted((results.get("n-samples") or {}).items()):
        if isinstance(samples, dict) and isinstance(samples.get("effective"), int):
            out[f"{task}/documents"] = samples["effective"]
    return out


class LmEval(Evaluator):
    """EleutherAI lm-evaluation-harness tasks (local YAML task definitions; extra 'eval')."""

    name = "lm_eval"
    Options = LmEvalOptions

    def check(self, base_dir: Path, config_path: str = "eval") -> None:
        _require_lm_eval(config_path)
        task_configs(self.options.task, base_dir, f"{config_path}.task")

    def input_paths(self, base_dir: Path) -> list[Path]:
        path = Path(base_dir) / self.options.task
        return [path] if path.exists() else []

    def evaluate(self, context: EvalContext) -> dict:
        import logging

        _require_lm_eval(context.config_path)
        tasks = task_configs(self.options.task, context.base_dir, f"{context.config_path}.task")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        with _quiet_progress():
            return self._evaluate(context, tasks, lm_eval, HFLM, TaskManager)

    def _evaluate(self, context: EvalContext, tasks: list, lm_eval: Any, HFLM: Any, TaskManager: Any) -> dict:  # noqa: N803
        lm = HFLM(pretrained=context.model, tokenizer=context.tokenizer, batch_size=self.options.batch_size, device=context.device)
        manager = TaskManager(verbosity="ERROR", include_defaults=any(isinstance(t, str) for t in tasks))
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=self.options.num_fewshot,
                limit=self.options.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=context.seed,
                numpy_random_seed=context.seed,
                torch_random_seed=context.seed,
                fewshot_random_seed=context.seed,
                verbosity="ERROR",
            )
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
            raise EvaluationError(
                f"{context.config_path}.task: lm_eval could not run '{self.options.task}': {type(exc).__name__}: {short_text(str(exc), 300)}"
            ) from None
        if not results:
            raise EvaluationError(f"{context.config_path}.task: lm_eval returned no results for '{self.options.task}'")
        return _figures(results)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """lm_eval's and datasets' progress bars off while the harness runs (``TQDM_DISABLE``)."""
    import os

    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        import datasets

        datasets.disable_progress_bars()
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


@hookimpl
def register_evaluators(register):
    register(LmEval)
