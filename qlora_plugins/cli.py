"""The ``qlora`` command line.

Heavy libraries are imported inside commands, so ``qlora --help`` and ``qlora plugins`` stay fast.
Errors caused by input print one line on stderr and exit with code 2 (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import click

from qlora_plugins.core.errors import QloraError, QuietExit, Terminated
from qlora_plugins.core.interfaces import KINDS
from qlora_plugins.core.wording import log_with_names


def _quiet_libraries() -> None:
    """Silence third-party progress bars and chatter; our own progress and summary remain."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _registry(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    if obj.get("registry") is None:
        from qlora_plugins.core.registry import create_registry

        obj["registry"] = create_registry()
    return obj["registry"]


@contextlib.contextmanager
def _json_stdout(as_json: bool) -> Iterator[TextIO]:
    """With ``--json``, stdout carries the JSON document only: whatever plugins or libraries
    print while the command works goes to stderr. Yields the stream to write the JSON to."""
    out = sys.stdout
    if not as_json:
        yield out
        return
    from qlora_plugins.core.registry import stdout_to_stderr

    with stdout_to_stderr():
        yield out


def _check_usable_path(path: Path, option: str) -> None:
    """One error line for a path the file system refuses outright (a name that is too long)."""
    from qlora_plugins.core.errors import short_text

    try:
        path.exists()
    except OSError as exc:
        raise QloraError(f"{option}: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None


def _warn_broken(registry: Any) -> None:
    for broken in registry.broken:
        click.echo(f"Warning: plugin problem: {broken.message()}", err=True)


def _origin(exc: BaseException) -> str:
    """`` raised at FILE:LINE`` for the frame that raised ``exc``."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return f" raised at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


#: The one place where the options that core messages name (marked with
#: ``qlora_plugins.core.wording.option``) become the command line's flags. Errors and progress
#: lines of ``qlora run``, ``qlora export``, ``qlora plan`` ... are spelled with it.
CLI_FLAGS: dict[str, str] = {
    "output": "--output",
    "force": "--force",
    "resume": "--resume",
    "exporter": "--exporter",
    "option": "--option",
    "set": "--set",
    "quantizer": "--quantizer",
    "quantizers": "--quantizers",
    "adapter": "--adapter",
    "optimizer": "--optimizer",
    "dtype": "--dtype",
    "device": "--device",
    "batch": "--batch",
    "seq": "--seq",
    "text": "--text",
    "revision": "--revision",
    "world_size": "--world-size",
    "strategy": "--strategy",
    "nproc_per_node": "--nproc-per-node",
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "rdzv_endpoint": "--rdzv-endpoint",
    "template": "--template",
    "prompts": "--prompts",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
}


def stderr_log(quiet: bool = False) -> Callable[[str], None]:
    """The log callable commands give the core: one line on stderr, options spelled as flags."""
    return log_with_names((lambda message: None) if quiet else (lambda message: click.echo(message, err=True)), CLI_FLAGS)


class QloraGroup(click.Group):
    """Root group: turns :class:`QloraError` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        def debug() -> bool:  # set by the group's callback, so read when handling an error
            return bool((ctx.obj or {}).get("debug")) or os.environ.get("QLORA_DEBUG") == "1"

        try:
            return super().invoke(ctx)
        except QuietExit:  # another rank of a distributed job reports the error
            ctx.exit(2)
        except QloraError as exc:
            if debug():
                raise
            click.echo(f"Error: {exc.render(CLI_FLAGS)}", err=True)
            ctx.exit(2)
        except SystemExit as exc:
            # click ends commands with its own ``Exit``; a SystemExit here comes from code a command
            # called (a plugin's quantizer or exporter calling sys.exit()), which must not pass for
            # the command's own result (``sys.exit(0)`` used to end `qlora run` silently with 0)
            if (ctx.obj or {}).get("debug") or os.environ.get("QLORA_DEBUG") == "1":
                raise
            click.echo(
                f"Error: {ctx.invoked_subcommand or 'qlora'}: stopped by SystemExit({exc.code!r}){_origin(exc)}, "
                "not by the command; a plugin called sys.exit()?",
                err=True,
            )
            ctx.exit(2)
        except OSError as exc:  # the environment (permissions, full disk), not the input's content
            if debug():
                raise
            where = f"{exc.filename}: " if isinstance(exc.filename, str) else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except Terminated:
            click.echo("Terminated (SIGTERM)", err=True)
            ctx.exit(EXIT_SIGTERM)


#: Exit codes of a command stopped by a signal (128 + the signal number, as shells report it).
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` (a KeyboardInterrupt) once, so a run stops as on
    Ctrl-C: checkpoint of the last completed step, run.json marked interrupted, temporaries
    removed. Further SIGTERMs while that cleanup runs are ignored."""
    import signal

    seen: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not seen:
            seen.append(signum)
            raise Terminated()

    signal.signal(signal.SIGTERM, handler)


@click.group(cls=QloraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-plugins", prog_name="qlora")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option(
    "--block", "blocked", multiple=True, metavar="NAME", help="Do not load the plugin NAME (entry point or builtin module); repeatable."
)
@click.option("--no-autoload", is_flag=True, help="Do not load plugins from installed packages (also QLORA_PLUGINS_DISABLE_AUTOLOAD=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, blocked: tuple[str, ...], no_autoload: bool) -> None:
    """QLoRA fine-tuning as swappable plugins.

    Compose a pipeline in a YAML config (model, quantizer, adapter, optimizer, data, train,
    export) and run it with `qlora run CONFIG`. `qlora plugins` lists what is installed.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if blocked or no_autoload:
        from qlora_plugins.core.registry import create_registry

        ctx.obj["registry"] = create_registry(blocked=blocked, load_entrypoints=False if no_autoload else None)


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.max_steps=20 (repeatable; values are YAML).",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Run directory (default: runs/<config name>-<timestamp>).")
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
@click.option(
    "--resume",
    "resume_dir",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[RUN_DIR]",
    help="Continue an interrupted run from its latest checkpoint (RUN_DIR, or --output).",
)
@click.option("--no-progress", is_flag=True, help="Do not show progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the summary table.")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1, 1024),
    default=None,
    help="Train on N processes of this machine (torchrun's elastic agent starts them; docs/distributed.md).",
)
@click.option("--nnodes", type=click.IntRange(1, 4096), default=1, show_default=True, help="Machines in the job (with --rdzv-endpoint).")
@click.option("--node-rank", type=click.IntRange(0, 4095), default=0, show_default=True, help="This machine's index among --nnodes.")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", default=None, help="Where the nodes meet (c10d rendezvous), for --nnodes > 1.")
@click.pass_context
def run(
    ctx: click.Context,
    config_path: Path,
    overrides: tuple[str, ...],
    output: Path | None,
    force: bool,
    resume_dir: str | None,
    no_progress: bool,
    as_json: bool,
    nproc_per_node: int | None,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str | None,
) -> None:
    """Run the pipeline described by CONFIG: load, quantize, attach the adapter, train, export.

    Writes a run directory with the resolved config (config.yaml), metrics.jsonl, report.json,
    loss.png, the trained adapter and the exports, then prints a summary table.

    With --nproc-per-node (and --nnodes/--node-rank/--rdzv-endpoint) the job runs on several
    processes through torch.distributed.run; under an external torchrun or accelerate launch it
    joins the job from the environment (RANK, WORLD_SIZE). Rank 0 writes the run directory.
    """
    from qlora_plugins.core.config import load_config

    config = load_config(config_path, list(overrides))
    registry = _registry(ctx)
    _warn_broken(registry)
    _quiet_libraries()
    from qlora_plugins.core import pipeline
    from qlora_plugins.core.safety import RUN_MARKER

    resume = resume_dir is not None
    output_given = output is not None or bool(resume_dir)
    if resume:
        if resume_dir:
            output = Path(resume_dir)
        if output is None:
            raise QloraError("--resume: name the run directory (--resume RUN_DIR or --output RUN_DIR)")
        if force:
            raise QloraError("--resume and --force cannot be combined")
    if output is None:
        output = Path("runs") / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_usable_path(output, "--resume" if resume_dir else "--output")
    log = stderr_log(quiet=as_json)
    from qlora_plugins.core import distributed

    world = distributed.detect()
    if nproc_per_node is not None or nnodes > 1:
        if world is not None:
            raise QloraError("--nproc-per-node: this qlora run was itself started by a launcher (RANK is set); drop the option")
        where = (nproc_per_node or 1, nnodes, node_rank, rdzv_endpoint)
        _launch(ctx, config, config_path, registry, output, overrides, force, resume, no_progress, as_json, where)
        return
    if world is not None and (world.world_size > 1 or config.train.distributed in distributed.STRATEGIES):
        try:
            with _json_stdout(as_json) as out:
                report = distributed.run_worker(
                    config,
                    registry,
                    output if (output_given or world.is_main) else None,
                    world,
                    force=force,
                    resume=resume,
                    log=log,
                    progress=not no_progress and not as_json,
                    debug=bool((ctx.find_root().obj or {}).get("debug")) or os.environ.get("QLORA_DEBUG") == "1",
                )
        except KeyboardInterrupt as exc:
            if world.is_main:
                click.echo(
                    f"{'Terminated (SIGTERM)' if isinstance(exc, Terminated) else 'Interrupted'}; continue with --resume {output}", err=True
                )
            ctx.exit(EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT)
        if report is not None:
            _print_report(report, as_json, out)
        return
    try:
        with _json_stdout(as_json) as out:
            report = pipeline.run(config, registry, output, force=force, log=log, progress=not no_progress and not as_json, resume=resume)
    except KeyboardInterrupt as exc:
        what = "Terminated (SIGTERM)" if isinstance(exc, Terminated) else "Interrupted"
        if (output / RUN_MARKER).is_file():
            click.echo(f"{what}; continue with: qlora run {config_path} --resume {output}", err=True)
        else:
            click.echo(f"{what} before the run directory was written", err=True)
        ctx.exit(EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT)
    _print_report(report, as_json, out)


def _print_report(report: dict, as_json: bool, out: TextIO) -> None:
    from qlora_plugins.core.report import format_table, summary_rows

    if as_json:
        from qlora_plugins.core.rundir import dumps

        click.echo(dumps(report, indent=2), file=out)
    else:
        click.echo(format_table(summary_rows(report), "qlora run: completed"))


def _launch(
    ctx: click.Context,
    config: Any,
    config_path: Path,
    registry: Any,
    output: Path,
    overrides: tuple[str, ...],
    force: bool,
    resume: bool,
    no_progress: bool,
    as_json: bool,
    where: tuple[int, int, int, str | None],
) -> None:
    """Refuse what cannot run distributed (before anything loads), then hand the job to
    torch.distributed.run with the same command for every rank."""
    from qlora_plugins.core import distributed, launch
    from qlora_plugins.core.config import resolve_plugins

    nproc, nnodes, node_rank, endpoint = where
    distributed.check_distributed(config, resolve_plugins(config, registry), nproc * nnodes)
    root = ctx.find_root()
    args: list[str] = ["--debug"] if (root.obj or {}).get("debug") else []
    for option in ("blocked",):
        args += [f"--block={name}" for name in root.params.get(option) or ()]
    if root.params.get("no_autoload"):
        args.append("--no-autoload")
    args += ["run", str(config_path)]
    for item in overrides:
        args += ["--set", item]
    args += ["--resume", str(output)] if resume else ["--output", str(output)]
    args += ["--force"] * force + ["--no-progress"] * no_progress + ["--json"] * as_json
    ctx.exit(launch.launch(args, nproc, nnodes, node_rank, endpoint))


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value before validating (repeatable).")
@click.pass_context
def validate(ctx: click.Context, config_path: Path, overrides: tuple[str, ...]) -> None:
    """Check CONFIG without loading a model: sections, plugin names and options, files."""
    from qlora_plugins.core.config import load_config
    from qlora_plugins.core.pipeline import check

    config = load_config(config_path, list(overrides))
    registry = _registry(ctx)
    checked = check(config, registry)
    p = checked.plugins
    names = f"quantizer={p.quantizer.name} adapter={p.adapter.name} optimizer={p.optimizer.name}"
    if p.data is not None:
        names += f" data={p.data.name}"
    if p.exporters:
        names += " export=" + ",".join(e.name for e in p.exporters)
    if p.evaluators:
        names += " eval=" + ",".join(e.name for e in p.evaluators)
    click.echo(f"{config_path}: valid ({names})")


@cli.command()
@click.option("--kind", type=click.Choice(sorted(KINDS)), help="Only plugins of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plugins(ctx: click.Context, kind: str | None, as_json: bool) -> None:
    """List registered plugins: kind, name, distribution, version, description; and broken ones."""
    with _json_stdout(as_json) as out:
        registry = _registry(ctx)
        rows = [r.as_dict() for r in registry.registrations(kind)]  # (descriptions are plugin code)
    broken = [b.as_dict() for b in registry.broken if kind is None or b.kind in (None, kind)]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "broken": broken, "blocked": registry.blocked}, indent=2), file=out)
        return
    headers = ("KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION")
    table = [(r["kind"], r["name"], r["distribution"], r["version"], r["description"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table)]
    for line in [headers, *table]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line[:-1], widths)) + "  " + str(line[-1]))
    for b in broken:
        click.echo(f"BROKEN  {b['distribution']} {b['version']} ({b['entry_point'] or b['plugin']}): {b['stage']}: {b['error']}")
    for name in registry.blocked:
        click.echo(f"BLOCKED {name}")


@cli.command("quant-report")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--quantizers", default="nf4,fp4,int4_sym,int4_asym", show_default=True, help="Comma-separated quantizer names.")
@click.option("--double-quant/--no-double-quant", default=False, show_default=True, help="Double-quantize the per-block constants.")
@click.option("--blocksize", default=64, show_default=True, type=int, help="Block size of every scheme.")
@click.option("--text", "text_file", type=click.Path(path_type=Path), help="Probe text file (UTF-8); default: a short built-in paragraph.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Window length for perplexity.")
@click.option("--max-tokens", default=4096, show_default=True, type=int, help="Probe tokens used at most.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own modeling code.")
@click.option(
    "--frozen-dtype",
    type=click.Choice(["bfloat16", "float16"]),
    help="Also measure each scheme with the unquantized frozen weights (embeddings, head) in this dtype (model.frozen_dtype).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.pass_context
def quant_report(
    ctx: click.Context,
    model_dir: Path,
    quantizers: str,
    double_quant: bool,
    blocksize: int,
    text_file: Path | None,
    seq_len: int,
    max_tokens: int,
    trust_remote_code: bool,
    frozen_dtype: str | None,
    as_json: bool,
) -> None:
    """Quantize MODEL_DIR with each scheme and compare: bits/param, weight error, output fidelity.

    Causal LMs are compared by perplexity on the probe text against the full-precision model;
    other models by the relative error and cosine similarity of their last hidden states.
    """
    from qlora_plugins.core.errors import ConfigError
    from qlora_plugins.core.options import check_range

    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ConfigError("--blocksize", f"must be a power of two in [32, 4096], got {blocksize}")
    check_range("--seq-len", seq_len, 2, 1_000_000)  # a perplexity window needs 2 tokens
    check_range("--max-tokens", max_tokens, 2, 100_000_000)
    if not [n for n in quantizers.split(",") if n.strip()]:
        raise ConfigError("--quantizers", "name at least one quantizer, e.g. nf4,fp4")
    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QloraError(f"--text: cannot read {text_file}: {exc}") from None
    _quiet_libraries()
    from qlora_plugins.core.quant_report import DEFAULT_PROBE, format_report, run_report

    names = [n.strip() for n in quantizers.split(",") if n.strip()]
    log = (lambda name: None) if as_json else (lambda name: click.echo(f"measured {name}", err=True))
    import torch

    with _json_stdout(as_json) as out:
        report = run_report(
            model_dir,
            names,
            _registry(ctx),
            double_quant,
            blocksize,
            text or DEFAULT_PROBE,
            seq_len,
            max_tokens,
            trust_remote_code=trust_remote_code,
            progress=log,
            frozen_dtype=getattr(torch, frozen_dtype) if frozen_dtype else None,
        )
    from qlora_plugins.core.rundir import dumps

    click.echo(dumps(report, indent=2) if as_json else format_report(report), file=out)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--exporter",
    "-e",
    "exporters",
    multiple=True,
    required=True,
    metavar="NAME",
    help="Exporter to run (repeatable): adapter, merged, merged_4bit, or an installed plugin's.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="Export directory (default: RUN_DIR/exports/NAME; with several exporters, OUTPUT/NAME each).",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Exporter option (values are YAML; repeatable): KEY=VALUE applies to every --exporter, NAME.KEY=VALUE "
    "to exporter NAME only; e.g. --option dtype=bfloat16, --option merged_4bit.correction_rank=16, "
    "--option tolerance.max_kl=0.01.",
)
@click.option("--force", is_flag=True, help="Replace an existing export (it stays untouched if the new one fails).")
@click.option("--json", "as_json", is_flag=True, help="Print the exports' facts and fidelity as JSON.")
@click.pass_context
def export(
    ctx: click.Context, run_dir: Path, exporters: tuple[str, ...], output: Path | None, options: tuple[str, ...], force: bool, as_json: bool
) -> None:
    """Export the finished run in RUN_DIR (its config.yaml and adapter/) with one or more exporters.

    The trained model is loaded back through the run's own plugins. Each export is written to a
    temporary directory, reloaded from disk and compared with the trained model on a probe batch
    (max/mean absolute logit difference, KL divergence, top-1 agreement); it is renamed into
    place with a manifest.json only if the figures are within the exporter's tolerance.
    Options recorded for the exporter in the run's config apply unless --option overrides them.
    """
    _check_usable_path(run_dir, "RUN_DIR")
    if output is not None:
        _check_usable_path(output, "--output")
    with _json_stdout(as_json) as out:
        registry = _registry(ctx)
        _warn_broken(registry)
        _quiet_libraries()
        from qlora_plugins.core.exporting import export_run
        from qlora_plugins.core.progress import Progress, use

        log = stderr_log(quiet=as_json)
        with use(Progress.for_terminal(not as_json, log)):
            results = export_run(run_dir, list(exporters), registry, output=output, options=list(options), force=force, log=log)
    from qlora_plugins.core.report import format_table, human_bytes

    if as_json:
        from qlora_plugins.core.rundir import dumps

        click.echo(dumps(results, indent=2), file=out)
        return
    rows = []
    for name, info in results.items():
        fid = info.get("fidelity", {})
        figures = ", ".join(
            f"{label} {fid[key]:.4g}"
            for key, label in (("kl", "KL"), ("top1", "top-1"), ("max_abs_diff", "max |dlogit|"))
            if isinstance(fid.get(key), (int, float))
        )
        rows.append((name, f"{info['path']} ({len(info['files'])} files, {human_bytes(info.get('bytes'))})"))
        rows.append(("  fidelity", f"{fid.get('status', '-')}" + (f": {figures}" if figures else "")))
    click.echo(format_table(rows, "qlora export: completed"))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: loads the plugins (which may add commands) and runs the CLI."""
    import sys

    from qlora_plugins.core.registry import create_registry

    args = list(sys.argv[1:] if argv is None else argv)
    # honour the root options before plugins add their subcommands (so --block hides them too)
    blocked = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--block"] + [
        a.split("=", 1)[1] for a in args if a.startswith("--block=")
    ]
    registry = create_registry(blocked=blocked, load_entrypoints=False if "--no-autoload" in args else None)
    registry.add_commands(cli)
    _raise_on_sigterm()
    cli.main(args=args, prog_name="qlora", obj={"registry": registry})
