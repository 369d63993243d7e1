"""Builtin command group ``qlora data``: ``qlora data preview CONFIG`` shows the examples as the
model will see them, the trained tokens marked, and the statistics of the whole set. It works for
every data format (it calls the format's ``load``, as a run does) and is added through the public
``register_commands(cli)`` hook, like a third party's command."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from qlora_plugins import hookimpl

IGNORE_INDEX = -100
#: Bins of the length histogram.
HISTOGRAM_BINS = 10


def _quiet() -> None:
    """No progress bars or warnings from transformers while the data is prepared."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def load_data(config: Any, registry: Any) -> tuple[Any, Any, Any]:
    """``(splits, tokenizer, data_format)``: the config's data loaded as ``qlora run`` loads it
    (a model source is materialized for its tokenizer; no model is loaded)."""
    from qlora_plugins import DataContext
    from qlora_plugins.api import check
    from qlora_plugins.errors import ConfigError
    from qlora_plugins.modeling import load_tokenizer

    checked = check(config, registry, materialize=True)
    data = checked.plugins.data
    if data is None:
        raise ConfigError("data", "the config has no data section, so there is nothing to preview")
    tokenizer = load_tokenizer(checked.model_dir, config.model.trust_remote_code)
    splits = data.load(DataContext(tokenizer, config.model.task, config.train.seed, config.base_dir, "data"))
    return splits, tokenizer, data


def _trained(example: dict) -> list[int] | None:
    labels = example["labels"]
    if not isinstance(labels, (list, tuple)):
        return None  # a class label (seq_cls)
    return [int(label != IGNORE_INDEX) for label in labels]


def histogram(lengths: Sequence[int], upper: int) -> list[dict]:
    """``HISTOGRAM_BINS`` equal bins of ``[1, upper]`` (``from``/``to`` inclusive) and counts."""
    width = max(1, math.ceil(upper / HISTOGRAM_BINS))
    bins = [{"from": i * width + 1, "to": (i + 1) * width, "count": 0} for i in range(math.ceil(upper / width))]
    for n in lengths:
        bins[min(max(n - 1, 0) // width, len(bins) - 1)]["count"] += 1
    return bins


def data_statistics(splits: Any, max_length: int | None) -> dict:
    """Figures of the whole set (train and eval): examples kept and dropped, tokens, the trained
    share, truncated examples and a length histogram."""
    examples = list(splits.train) + list(splits.eval)
    lengths = [len(e["input_ids"]) for e in examples]
    masks = [_trained(e) for e in examples]
    token_level = bool(masks) and all(m is not None for m in masks)
    tokens = sum(lengths)
    trained = sum(sum(m) for m in masks if m is not None) if token_level else None
    upper = max([max_length or 0, *lengths, 1])
    return {
        "rows": splits.rows,
        "examples": len(examples),
        "train_examples": len(splits.train),
        "eval_examples": len(splits.eval),
        "dropped": splits.dropped,
        "truncated": getattr(splits, "truncated", None),
        "max_length": max_length,
        "at_max_length": sum(1 for n in lengths if max_length and n >= max_length),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": (trained / tokens if tokens else 0.0) if trained is not None else None,
        "length": {
            "min": min(lengths, default=0),
            "median": statistics.median(lengths) if lengths else 0,
            "mean": round(statistics.fmean(lengths), 2) if lengths else 0,
            "max": max(lengths, default=0),
        },
        "histogram": histogram(lengths, upper),
    }


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def example_record(example: dict, tokenizer: Any, split: str, index: int) -> dict:
    """One example for ``--json``: token ids, each token decoded, the 0/1 trained mask (or the
    class label)."""
    ids = [int(i) for i in example["input_ids"]]
    mask = _trained(example)
    record: dict[str, Any] = {"split": split, "index": index, "length": len(ids), "input_ids": ids}
    record["tokens"] = [_decode(tokenizer, [i]) for i in ids]
    if mask is None:
        record["label"] = example["labels"]
    else:
        record["trained"] = mask
        record["trained_tokens"] = sum(mask)
    record["text"] = _decode(tokenizer, ids)
    return record


def marked_text(example: dict, tokenizer: Any, colour: bool) -> str:
    """The example decoded, its trained runs in colour or between ``[[`` and ``]]``."""
    ids, mask = list(example["input_ids"]), _trained(example)
    if mask is None:
        return _decode(tokenizer, ids)
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = _decode(tokenizer, ids[start:end])
            if mask[start]:
                parts.append(click.style(text, fg="green", bold=True) if colour else f"[[{text}]]")
            else:
                parts.append(click.style(text, dim=True) if colour else text)
            start = end
    return "".join(parts)


def _bar(count: int, most: int, width: int = 40) -> str:
    return "#" * (round(width * count / most) if most else 0)


def format_statistics(stats: dict) -> str:
    """The statistics as aligned lines and a histogram."""
    rows = [("rows read", "-" if stats["rows"] is None else str(stats["rows"]))]
    rows.append(("examples kept", f"{stats['examples']} ({stats['train_examples']} train, {stats['eval_examples']} eval)"))
    rows.append(("dropped", str(stats["dropped"])))
    truncated = "not reported by the format" if stats["truncated"] is None else str(stats["truncated"])
    rows.append(("truncated", f"{truncated} ({stats['at_max_length']} at max_length={stats['max_length']})"))
    rows.append(("tokens", str(stats["tokens"])))
    if stats["trained_tokens"] is not None:
        rows.append(("trained tokens", f"{stats['trained_tokens']} ({100 * stats['trained_share']:.1f}%)"))
    length = stats["length"]
    rows.append(("length", f"min {length['min']}, median {length['median']:g}, mean {length['mean']:g}, max {length['max']}"))
    width = max(len(label) for label, _ in rows)
    lines = ["Statistics (train and eval)"] + [f"  {label:<{width}}  {value}" for label, value in rows]
    most = max((b["count"] for b in stats["histogram"]), default=0)
    span = len(str(stats["histogram"][-1]["to"])) if stats["histogram"] else 1
    lines.append("Length histogram (tokens)")
    for b in stats["histogram"]:
        lines.append(f"  {b['from']:>{span}}-{b['to']:<{span}}  {b['count']:>6}  {_bar(b['count'], most)}")
    return "\n".join(lines)


@click.group("data")
def data_group() -> None:
    """Inspect training data as the model will see it."""


@data_group.command("preview")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value first (repeatable).")
@click.option("--n", "count", default=3, show_default=True, type=click.IntRange(0, 100_000), help="Examples to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: per example the token ids, tokens and trained mask; the statistics.")
@click.option(
    "--color/--no-color",
    "colour",
    default=None,
    help="Colour the trained tokens (default: when stdout is a terminal and NO_COLOR is unset); without colour they are in [[...]].",
)
@click.pass_context
def preview_command(
    ctx: click.Context, config_path: Path, overrides: tuple[str, ...], count: int, as_json: bool, colour: bool | None
) -> None:
    """Show the first N examples of CONFIG's data as the model will see them (after the chat
    template, tokenization and truncation), the trained tokens marked, and the statistics of the
    whole set: examples kept and dropped, tokens, the trained share, truncated examples and a
    length histogram. Works for every data format; loads the tokenizer, not the model.
    """
    from qlora_plugins.api import load_config

    config = load_config(config_path, list(overrides))
    registry = (ctx.find_object(dict) or {}).get("registry")
    if registry is None:
        from qlora_plugins.api import create_registry

        registry = create_registry()
    _quiet()
    splits, tokenizer, data = load_data(config, registry)
    stats = data_statistics(splits, getattr(data.options, "max_length", None))
    shown = [("train", i, e) for i, e in enumerate(splits.train)] + [("eval", i, e) for i, e in enumerate(splits.eval)]
    shown = shown[:count]
    if as_json:
        document = {
            "config": str(config_path),
            "format": data.name,
            "task": config.model.task,
            "examples": [example_record(e, tokenizer, split, i) for split, i, e in shown],
            "statistics": stats,
        }
        click.echo(json.dumps(document, ensure_ascii=False))
        return
    if colour is None:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    sizes = {"train": len(splits.train), "eval": len(splits.eval)}
    click.echo(f"{config_path}: data format '{data.name}'; trained tokens are " + ("in colour" if colour else "in [[...]]"))
    for split, i, example in shown:
        mask = _trained(example)
        what = f"{sum(mask)} trained" if mask is not None else f"label {example['labels']}"
        click.echo(f"\n--- {split} example {i + 1} of {sizes[split]}: {len(example['input_ids'])} tokens, {what} ---")
        click.echo(marked_text(example, tokenizer, colour), color=colour)
    click.echo("\n" + format_statistics(stats))


@hookimpl
def register_commands(cli):
    existing = cli.commands.get("data") if isinstance(cli, click.Group) else None
    if isinstance(existing, click.Group) and existing is not data_group:
        existing.add_command(preview_command)  # another plugin's `qlora data` group: join it
    else:
        cli.add_command(data_group)
