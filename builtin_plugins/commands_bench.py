"""Builtin command ``qlora bench tradeoffs CONFIG``: the source document's trade-off table
(full fine-tuning, LoRA, QLoRA, QLoRA + gradient checkpointing), measured on the user's own
model, data and optimizer. Each variant is the user's pipeline with a few ``--set`` overrides,
run for N steps by ``qlora run`` in a fresh process (so peak memory is that variant's alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from qlora_plugins import hookimpl

#: The methods of the table, in its order.
VARIANTS = ("full", "lora", "qlora", "qlora_gc")
LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA (full-precision base)",
    "qlora": "QLoRA (4-bit base + LoRA)",
    "qlora_gc": "QLoRA + gradient checkpointing",
}


def variant_overrides(name: str, quantizer: dict, adapter: dict, steps: int) -> list[str]:
    """``--set`` values that turn the user's config into variant ``name``."""
    lora = adapter if adapter.get("name") == "lora" else {"name": "lora"}
    quant = quantizer if quantizer.get("name", "nf4") != "none" else {"name": "nf4", "double_quant": True}
    sections = {
        "full": ({"name": "none"}, {"name": "full"}, False),
        "lora": ({"name": "none"}, lora, False),
        "qlora": (quant, lora, False),
        "qlora_gc": (quant, lora, True),
    }[name]
    return [
        f"quantizer={json.dumps(sections[0])}",
        f"adapter={json.dumps(sections[1])}",
        f"train.gradient_checkpointing={json.dumps(sections[2])}",
        f"train.max_steps={steps}",
        "train.epochs=null",
        "train.checkpoint_every=null",
        "export=[]",
    ]


def _section(raw: dict, key: str, default: str) -> dict:
    value = raw.get(key)
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return {"name": default, **value}
    return {"name": default}


def run_variant(config: Path, overrides: list[str], output: Path, timeout: float | None) -> dict:
    """``qlora run`` in a fresh Python process; returns its report (or the error)."""
    cmd = [
        sys.executable,
        "-c",
        "from qlora_plugins.cli import main; main()",
        "run",
        str(config),
        "--output",
        str(output),
        "--force",
        "--no-progress",
        "--json",
    ]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    report = output / "report.json"
    if proc.returncode != 0 or not report.is_file():
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(report.read_text(encoding="utf-8"))


def summarize(name: str, report: dict) -> dict:
    """The table's figures for one variant."""
    if "error" in report:
        return {"variant": name, "method": LABELS[name], "error": report["error"]}
    training, memory, params = report.get("training", {}), report.get("memory", {}), report.get("parameters", {})
    peak = memory.get("cuda_peak_allocated_bytes") or memory.get("peak_rss_bytes")
    return {
        "variant": name,
        "method": LABELS[name],
        "trainable_params": params.get("trainable"),
        "trainable_percent": params.get("trainable_percent"),
        "peak_memory_bytes": peak,
        "memory_kind": "cuda max allocated" if memory.get("cuda_peak_allocated_bytes") else "peak RSS",
        "step_time_s": training.get("median_step_time_s"),
        "eval_loss": training.get("eval_loss"),
        "train_loss": [training.get("first_loss"), training.get("last_loss")],
        "bits_per_param": report.get("quantization", {}).get("bits_per_param"),
    }


def add_ratios(rows: list[dict]) -> None:
    """Memory and speed relative to full fine-tuning (and speed relative to LoRA), eval loss
    difference to full fine-tuning: the columns of the source document's table."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    full, lora = by.get("full"), by.get("lora")
    for row in by.values():
        if full and full.get("peak_memory_bytes") and row.get("peak_memory_bytes"):
            row["memory_vs_full"] = row["peak_memory_bytes"] / full["peak_memory_bytes"]
        if full and full.get("step_time_s") and row.get("step_time_s"):
            row["speed_vs_full"] = full["step_time_s"] / row["step_time_s"]
        if lora and lora.get("step_time_s") and row.get("step_time_s"):
            row["speed_vs_lora"] = lora["step_time_s"] / row["step_time_s"]
        if full and full.get("eval_loss") is not None and row.get("eval_loss") is not None:
            row["eval_loss_vs_full"] = row["eval_loss"] - full["eval_loss"]


def format_rows(rows: list[dict], steps: int) -> str:
    """The trade-off table as text."""

    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    headers = ("method", "trainable", "peak memory", "vs full", "step time", "speed vs full", "speed vs LoRA", "eval loss", "vs full")
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["method"], "failed: " + r["error"], "", "", "", "", "", "", ""))
            continue
        mem = r.get("peak_memory_bytes")
        table.append(
            (
                r["method"],
                f"{f(r.get('trainable_percent'), '.2f')}%",
                "-" if mem is None else f"{mem / 1e6:,.0f} MB",
                f"{f(r.get('memory_vs_full'), '.2f')}x",
                f"{f(r.get('step_time_s'), '.3f')} s",
                f"{f(r.get('speed_vs_full'), '.2f')}x",
                f"{f(r.get('speed_vs_lora'), '.2f')}x",
                f(r.get("eval_loss"), ".4f"),
                f(r.get("eval_loss_vs_full"), "+.4f"),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table)]
    lines = [f"qlora bench tradeoffs: {steps} steps each, fresh process per method", ""]
    for line in (headers, *table):
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    kinds = {r.get("memory_kind") for r in rows if r.get("memory_kind")}
    lines += [
        "",
        f"peak memory: {', '.join(sorted(kinds))} of the whole process; step time: median; "
        "eval loss: the pipeline's evaluation split after the last step",
    ]
    return "\n".join(lines)


@click.group("bench")
def bench_group() -> None:
    """Measure the pipeline's trade-offs on your own model and data."""


@bench_group.command("tradeoffs")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1, None), help="Optimizer steps per method.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value for every method (repeatable).")
@click.option("--methods", default=",".join(VARIANTS), show_default=True, help="Comma-separated subset of: " + ", ".join(VARIANTS) + ".")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Keep the run directories here (default: a temporary directory).")
@click.option("--timeout", default=None, type=float, help="Seconds allowed per method.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def tradeoffs(
    config_path: Path, steps: int, overrides: tuple[str, ...], methods: str, output: Path | None, timeout: float | None, as_json: bool
) -> None:
    """Run CONFIG for --steps steps as full fine-tuning, LoRA on the full-precision model, QLoRA
    and QLoRA + gradient checkpointing, each in a fresh process, and print the trade-off table:
    trainable parameters, peak memory, step time, speed and eval loss, relative to full
    fine-tuning (and speed relative to LoRA).

    The four runs share everything else in CONFIG (model, data, optimizer, batch, seed). QLoRA
    uses CONFIG's quantizer if it quantizes, else nf4 with double quantization; LoRA uses CONFIG's
    adapter if it is lora, else lora's defaults. Exports and checkpoints are skipped.
    """
    from qlora_plugins.api import apply_overrides, check, create_registry, load_config, read_config_file
    from qlora_plugins.errors import ConfigError, QloraError

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in VARIANTS]
    if unknown or not chosen:
        raise ConfigError("--methods", f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    root = click.get_current_context().find_root()
    registry = (root.obj or {}).get("registry")
    if registry is None:
        registry = create_registry()
    check(load_config(config_path, list(overrides)), registry)  # the user's config must be valid as written
    raw = apply_overrides(read_config_file(config_path), list(overrides))
    quantizer, adapter = _section(raw, "quantizer", "nf4"), _section(raw, "adapter", "lora")
    for name in chosen:  # every variant must be a valid config before anything runs
        check(load_config(config_path, [*overrides, *variant_overrides(name, quantizer, adapter, steps)]), registry)
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        base = output if output is not None else Path(tmp)
        rows = []
        for name in chosen:
            if not as_json:
                click.echo(f"running {LABELS[name]} ({steps} steps)...", err=True)
            report = run_variant(config_path, [*overrides, *variant_overrides(name, quantizer, adapter, steps)], base / name, timeout)
            rows.append(summarize(name, report))
    add_ratios(rows)
    if as_json:
        click.echo(json.dumps({"steps": steps, "config": str(config_path), "methods": rows}, indent=2))
    else:
        click.echo(format_rows(rows, steps))
    failed = [r["variant"] for r in rows if "error" in r]
    if failed:
        raise QloraError(f"{', '.join(failed)} failed (see the table)")


@hookimpl
def register_commands(cli):
    cli.add_command(bench_group)
