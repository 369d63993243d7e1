"""Builtin command ``qlora eval``: run evaluators on a run, an export or a model directory, the
base model and the fine-tuned one side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qlora_plugins import hookimpl


def _run_config(target: Path, kind: str) -> dict | None:
    """The run config recorded by a run (config.yaml) or an export (manifest.json), if readable."""
    import contextlib

    with contextlib.suppress(Exception):
        if kind == "run":
            from qlora_plugins.api import load_yaml

            data = load_yaml((target / "config.yaml").read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        if kind == "export":
            data = json.loads((target / "manifest.json").read_text(encoding="utf-8")).get("config")
            return data if isinstance(data, dict) else None
    return None


def _record(target: Path, results: dict) -> None:
    """Merge the results into a run's report.json under ``evaluations`` (a regular file only)."""
    import contextlib

    from qlora_plugins.api import atomic_write_json

    path = target / "report.json"
    if path.is_symlink() or not path.is_file():
        return
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(report, dict):
            evaluations = report.get("evaluations") if isinstance(report.get("evaluations"), dict) else {}
            report["evaluations"] = {**evaluations, **results}
            atomic_write_json(path, report)


@click.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--evaluator",
    "-e",
    "evaluators",
    multiple=True,
    required=True,
    metavar="NAME",
    help="Evaluator to run (repeatable): perplexity, lm_eval, or an installed plugin's (qlora plugins --kind evaluator).",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Evaluator option (values are YAML; repeatable): KEY=VALUE applies to every --evaluator, NAME.KEY=VALUE to "
    "evaluator NAME only; e.g. --option path=heldout.txt, --option lm_eval.task=tasks/mc.yaml.",
)
@click.option("--no-base", is_flag=True, help="Evaluate only the fine-tuned model (not the base with the adapter disabled).")
@click.option(
    "--template",
    type=click.Choice(["auto", "chat", "plain"]),
    default="auto",
    show_default=True,
    help="Whether evaluators render conversations with the tokenizer's chat template (auto: when the run trained on chat data).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
@click.pass_context
def eval_command(
    ctx: click.Context, target: Path, evaluators: tuple[str, ...], options: tuple[str, ...], no_base: bool, template: str, as_json: bool
) -> None:
    """Evaluate TARGET (a run directory, an export directory or a model directory) with one or
    more evaluators.

    For a run or an export, each evaluator measures the base model (the adapter disabled, or the
    base loaded again for a merged export) and then the fine-tuned model, and the table shows
    both and the change. Options recorded for the evaluator in the run's `eval` section apply
    unless --option overrides them; relative paths in --option are relative to the current
    directory. For a run directory the results are also added to its report.json.
    """
    from qlora_plugins import EvalContext
    from qlora_plugins.api import recorded_plugin_options
    from qlora_plugins.builtin_plugins.commands_generate import _log, _quiet, _registry
    from qlora_plugins.errors import ConfigError
    from qlora_plugins.evaluation import as_is, check_evaluators, format_results, run_evaluators
    from qlora_plugins.inference import kind_of, load_target, model_task, use_chat_template

    registry = _registry(ctx)
    if len(set(evaluators)) != len(evaluators):
        raise ConfigError("--evaluator", "name each evaluator once")
    kind = kind_of(target)
    run_config = _run_config(target, kind)
    plugins = []
    for name in evaluators:
        registry.get("evaluator", name, f"--evaluator {name}")
        plugins.append(
            registry.create(
                "evaluator", name, recorded_plugin_options(run_config, "eval", name, options, evaluators), f"--evaluator {name}"
            )
        )
    paths = [f"--evaluator {e.name}" for e in plugins]
    task = ((run_config or {}).get("model") or {}).get("task") or ("causal_lm" if kind != "model" else model_task(target))
    check_evaluators(plugins, task, Path.cwd(), registry, paths)
    _quiet()
    log = (lambda message: None) if as_json else _log
    loaded = load_target(target, registry, log)
    chat = use_chat_template(loaded, template)
    context = EvalContext(None, loaded.tokenizer, loaded.device, loaded.task, "model", chat, Path.cwd(), loaded.seed)
    if loaded.has_base:
        models = [("fine_tuned", lambda: as_is(loaded.model))]
        if not no_base:
            models.insert(0, ("base", loaded.base_model))
    else:
        models = [("model", lambda: as_is(loaded.model))]
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # stdout: the JSON only
        results = run_evaluators(plugins, models, context, registry, paths, log)
    for name, plugin in zip(evaluators, plugins):
        from qlora_plugins.options import options_to_dict

        results[name]["options"] = options_to_dict(plugin.options)
    if kind == "run":
        _record(target, results)
    if as_json:
        from qlora_plugins.api import dumps

        click.echo(dumps(results, indent=2))
    else:
        click.echo(format_results(results))


@hookimpl
def register_commands(cli):
    cli.add_command(eval_command)
