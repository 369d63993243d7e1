"""The run report: report.json, the loss-curve PNG and the summary table printed at the end."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

from qlora_plugins.core.rundir import read_metrics, write_error


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is ``VmHWM`` (the high-water mark of this process's own address space):
    ``ru_maxrss`` carries a parent's resident size over into a child across fork+exec, so a
    ``qlora run`` started from a big process would report at least its parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def plot_loss(metrics_path: Path, png_path: Path, title: str) -> bool:
    """Draw train (and eval) loss against step into ``png_path``; False if there is nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(png_path, exc) from None
    finally:
        plt.close(fig)
    return True


def human_bytes(n: float | None) -> str:
    """``1.2 MB`` style (decimal units)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def format_table(rows: list[tuple[str, Any]], title: str = "") -> str:
    """A two-column text table."""
    width = max(len(k) for k, _ in rows) if rows else 0
    lines = [title, "-" * max(len(title), 40)] if title else []
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def summary_rows(report: dict) -> list[tuple[str, Any]]:
    """The rows of the end-of-run summary."""
    p, t, q = report.get("parameters", {}), report.get("training", {}), report.get("quantization", {})
    plugins = report.get("plugins", {})

    def fmt(x: Any, spec: str = ".4f") -> str:
        return "-" if x is None else format(x, spec)

    rows = [
        ("model", report.get("model", {}).get("path", "-")),
        ("plugins", ", ".join(f"{k}={v['name']}" for k, v in plugins.items() if isinstance(v, dict))),
        ("parameters", f"{p.get('total', 0):,} total, {p.get('trainable', 0):,} trainable ({fmt(p.get('trainable_percent'), '.2f')}%)"),
        (
            "quantized",
            f"{q.get('quantized_params', 0):,} params in {human_bytes(q.get('quantized_bytes'))} ({fmt(q.get('bits_per_param'), '.3f')} bits/param)",
        ),
    ]
    if t:
        rows += [
            ("steps", t.get("steps")),
            ("loss", f"{fmt(t.get('first_loss'))} -> {fmt(t.get('last_loss'))}"),
            ("eval loss", fmt(t.get("eval_loss"))),
            ("time per step", f"{fmt(t.get('median_step_time_s'), '.3f')} s (median)"),
        ]
    data = report.get("data") or {}
    packing = data.get("packing")
    if packing:
        rows.append(
            (
                "packing",
                f"{packing['examples']:,} examples in {packing['packs']:,} sequences of {packing['max_length']} tokens "
                f"({100 * packing['fill']:.1f}% full)",
            )
        )
    for source in data.get("sources") or []:
        rows.append(
            (
                f"source {Path(str(source['path'])).name}",
                f"{source['train_examples']:,} examples ({100 * source['example_share']:.1f}%), "
                f"{source['tokens']:,} tokens ({100 * source['token_share']:.1f}%)",
            )
        )
    rows.append(("peak memory", human_bytes(report.get("memory", {}).get("peak_rss_bytes"))))
    if report.get("memory", {}).get("load_peak_rss_bytes"):
        rows.append(("peak memory while loading", human_bytes(report["memory"]["load_peak_rss_bytes"])))
    for note in report.get("notes", []):
        rows.append(("note", note))
    for name, info in report.get("exports", {}).items():
        rows.append((f"export {name}", info.get("path", "-")))
    if report.get("evaluations"):  # issue 14: base and fine-tuned side by side
        from qlora_plugins.core.evaluation import table_rows

        headers, table = table_rows(report["evaluations"])
        for row in table:
            rows.append((f"eval {row[0]} {row[1]}", ", ".join(f"{h} {v}" for h, v in zip(headers[2:], row[2:]))))
    rows.append(("run directory", report.get("run_dir", "-")))
    return rows
