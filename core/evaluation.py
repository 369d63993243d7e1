"""Running evaluators (the ``evaluator`` plugin kind) on a model and its base, side by side, and
the helpers evaluators share (token-weighted negative log-likelihood).

``qlora eval TARGET`` and a config's ``eval`` section both come here: each evaluator measures
the base model (adapter disabled) and then the fine-tuned one; the results are one mapping per
evaluator (``{"base": {...}, "fine_tuned": {...}, "seconds": s}``) recorded in report.json
under ``evaluations`` and printed as a table.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

from qlora_plugins.core.errors import EvaluationError, PluginError, QloraError
from qlora_plugins.core.interfaces import EvalContext
from qlora_plugins.core.loading import _first_line, plugin_check

Log = Callable[[str], None]

#: Labels of the models, in the order they are evaluated and shown.
LABELS = ("base", "fine_tuned", "model")
_SHOWN = {"base": "base", "fine_tuned": "fine-tuned", "model": "model"}


def check_evaluators(evaluators: Sequence[Any], task: str, base_dir: Path, registry: Any, paths: Sequence[str]) -> None:
    """Each evaluator's :meth:`~qlora_plugins.Evaluator.check` and task, before anything loads."""
    from qlora_plugins.core.errors import ConfigError

    for evaluator, where in zip(evaluators, paths):
        if task not in evaluator.tasks:
            raise ConfigError(where, f"evaluator '{evaluator.name}' supports task(s) {', '.join(evaluator.tasks)}, not {task}")
        with plugin_check(registry, evaluator, where):
            evaluator.check(Path(base_dir), where)


def _figures(value: Any, evaluator: Any, source: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PluginError(
            f"evaluator '{evaluator.name}' ({source}) returned {type(value).__name__}, not a mapping of metric names to figures"
        )
    return dict(value)


def run_evaluators(
    evaluators: Sequence[Any],
    models: Sequence[tuple[str, Callable[[], ContextManager[Any]]]],
    context: EvalContext,
    registry: Any,
    paths: Sequence[str],
    log: Log = lambda m: None,
) -> dict:
    """Evaluate each model (``(label, context manager factory yielding the model)``, e.g.
    ``("base", target.base_model)``) with each evaluator. ``context`` gives everything but the
    model and label. A model is made ready once and measured by every evaluator in turn.

    :returns: ``{evaluator name: {label: figures, ..., "seconds": s}}``.
    :raises PluginError: an evaluator that fails with anything but an input error.
    """
    import attrs
    import torch

    results: dict[str, dict] = {e.name: {} for e in evaluators}
    seconds = {e.name: 0.0 for e in evaluators}
    for label, make in models:
        with make() as model:
            model.eval()
            ctx = attrs.evolve(context, model=model, label=label)
            for evaluator, where in zip(evaluators, paths):
                source = registry.registration("evaluator", evaluator.name).source.describe()
                log(f"Evaluating the {_SHOWN.get(label, label)} model with '{evaluator.name}'")
                started = time.perf_counter()
                try:
                    with torch.no_grad():
                        figures = evaluator.evaluate(attrs.evolve(ctx, config_path=where))
                except QloraError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"{where}: evaluator '{evaluator.name}' ({source}) failed on the {_SHOWN.get(label, label)} model: "
                        f"{type(exc).__name__}: {_first_line(exc)}"
                    ) from exc
                seconds[evaluator.name] += time.perf_counter() - started
                results[evaluator.name][label] = _figures(figures, evaluator, source)
    for name in results:
        results[name]["seconds"] = round(seconds[name], 3)
    return results


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _shown(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the evaluation table: one row per evaluator and numeric metric, one
    column per model, and the change from base to fine-tuned when both are there."""
    labels = [label for label in LABELS if any(label in r for r in results.values())]
    headers = ["evaluator", "metric", *(_SHOWN[label] for label in labels)]
    both = "base" in labels and "fine_tuned" in labels
    if both:
        headers.append("change")
    rows = []
    for name, result in results.items():
        metrics: list[str] = []
        for label in labels:
            for key, value in (result.get(label) or {}).items():
                if _number(value) is not None and key not in metrics:
                    metrics.append(key)
        for key in metrics:
            values = [_number((result.get(label) or {}).get(key)) for label in labels]
            row = [name, key, *(_shown(v) for v in values)]
            if both:
                base, tuned = _number(result["base"].get(key)), _number(result["fine_tuned"].get(key))
                row.append(_shown(tuned - base) if base is not None and tuned is not None else "-")
            rows.append(row)
    return headers, rows


def format_results(results: dict) -> str:
    """The evaluation table as text (what ``qlora eval`` and ``qlora run`` print)."""
    headers, rows = table_rows(results)
    if not rows:
        return "(no numeric figures)"
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)


# --- helpers for evaluators ----------------------------------------------------------------


def sequence_nll(model: Any, token_ids: Sequence[int], window: int) -> tuple[float, int]:
    """Sum of the negative log-likelihood (nats) of every token of ``token_ids`` after the first,
    each predicted from the tokens before it in its window, and how many tokens that is.
    The sequence is cut into consecutive windows of ``window`` tokens (the first token of each
    window is context only)."""
    import torch

    device = next(iter(model.parameters())).device
    total, count = 0.0, 0
    ids = list(token_ids)
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        x = torch.tensor([chunk], dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].double()
        logp = torch.log_softmax(logits, dim=-1)
        target = x[0, 1:]
        total += float(-logp.gather(1, target[:, None]).sum())
        count += len(chunk) - 1
    return total, count


def token_weighted_perplexity(model: Any, sequences: Iterable[Sequence[int]], window: int) -> dict:
    """Token-weighted mean NLL over ``sequences`` and its perplexity: ``{"nll", "perplexity",
    "tokens", "sequences"}``.

    :raises EvaluationError: no sequence has two tokens.
    """
    total, count, n = 0.0, 0, 0
    for ids in sequences:
        nll, tokens = sequence_nll(model, ids, window)
        total, count, n = total + nll, count + tokens, n + 1
    if count == 0:
        raise EvaluationError("no text to score: every example is shorter than two tokens")
    mean = total / count
    return dict(nll=mean, perplexity=math.exp(mean) if mean < 700 else math.inf, tokens=count, sequences=n)


@contextlib.contextmanager
def as_is(model: Any) -> Any:
    """A context manager yielding ``model`` unchanged (the fine-tuned model's entry in
    :func:`run_evaluators`)."""
    yield model
