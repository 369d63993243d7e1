"""Builtin data formats: ``instruction`` (prompt masked from the loss), ``text`` (plain causal-LM
text cut into blocks) and ``classification`` (a text column and a label column)."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import attrs

from qlora_plugins import DataContext, DataFormat, DataOptions, DataSplits, hookimpl
from qlora_plugins.data import check_data_file, read_rows, require_columns, split_indices
from qlora_plugins.errors import DataError, short_repr, short_text

IGNORE_INDEX = -100


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and not math.isfinite(value):
        return "an infinite number"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def cell_text(value: Any, where: str, row: int, column: str) -> str:
    """The text of one cell: strings as they are, a missing cell (null, an empty csv field) as
    ``""``, integers and finite numbers as their decimal text. Anything else (lists, mappings,
    booleans, NaN) is refused rather than trained on as its Python spelling.

    :param where: ``"data.path: FILE"`` for the error; ``row`` counts from 1.
    """
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise DataError(f"{where} row {row} column '{column}': expected text, got {_kind(value)} ({short_repr(value, 40)})")


def _check_kept(context: DataContext, options: Any, path: Path, rows: int, kept: int, reason: str) -> None:
    """Refuse a dataset of which fewer than ``data.min_kept_fraction`` of the rows survive."""
    if rows and kept < options.min_kept_fraction * rows:
        raise DataError(
            f"{context.config_path}.max_length: only {kept} of {rows} rows of {path.name} are usable ({rows - kept} dropped: {reason}); "
            f"data.min_kept_fraction is {options.min_kept_fraction:g}; raise max_length or lower min_kept_fraction"
        )


def _resolve(context: DataContext, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else context.base_dir / path


def _limit(rows: Any, max_examples: int | None) -> Any:
    return rows.select(range(min(len(rows), max_examples))) if max_examples else rows


def _split(examples: list[dict], options: Any, seed: int) -> tuple[list[dict], list[dict]]:
    train_idx, eval_idx = split_indices(len(examples), options.eval_fraction, seed)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


class _FileFormat(DataFormat):
    def check(self, base_dir: Path, config_path: str = "data") -> None:
        path = Path(self.options.path).expanduser()
        check_data_file(path if path.is_absolute() else base_dir / path, f"{config_path}.path")


@attrs.define
class InstructionOptions(DataOptions):
    """Columns of an instruction dataset and the prompt template."""

    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    template: str = attrs.field(default="### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
    input_template: str = attrs.field(default="### Input:\n{input}\n\n")

    @template.validator
    def _check_template(self, attribute: attrs.Attribute, value: str) -> None:
        _check_placeholders(attribute, value, {"instruction": "", "input_block": ""})

    @input_template.validator
    def _check_input_template(self, attribute: attrs.Attribute, value: str) -> None:
        _check_placeholders(attribute, value, {"input": ""})


def _check_placeholders(attribute: attrs.Attribute, template: str, fields: dict) -> None:
    """Fail at config time (not mid-run) on a template with unknown or malformed placeholders, or
    with placeholders that reach into a value (``{instruction.__class__}``, ``{input[0]}``)."""
    allowed = ", ".join("{" + name + "}" for name in fields)
    try:
        template.format(**fields)
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        problem = (
            f"unknown placeholder {{{short_text(exc.args[0])}}}"
            if isinstance(exc, KeyError)
            else f"invalid format string ({short_text(exc, 200)})"
        )
        raise ValueError(f"{problem}; it may use {allowed} (double braces for literal ones)", attribute) from None
    for name in names:
        if name not in fields:
            raise ValueError(
                f"placeholder {{{short_text(name)}}} may only name a field, not its attributes or items; it may use {allowed}", attribute
            )


class Instruction(_FileFormat):
    """Instruction / input / output rows; the prompt is masked out of the loss."""

    name = "instruction"
    Options = InstructionOptions
    tasks = ("causal_lm",)

    def load(self, context: DataContext) -> DataSplits:
        o = self.options
        path = _resolve(context, o.path)
        rows = _limit(read_rows(path, f"{context.config_path}.path"), o.max_examples)
        require_columns(rows, [o.instruction_column, o.output_column], path, f"{context.config_path}.path")
        tok = context.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        has_input = o.input_column in rows.column_names
        where = f"{context.config_path}.path: {path.name}"
        examples, too_long, empty = [], 0, 0
        answers_seen = False
        for number, row in enumerate(rows, start=1):
            inp = cell_text(row.get(o.input_column), where, number, o.input_column) if has_input else ""
            prompt = o.template.format(
                instruction=cell_text(row[o.instruction_column], where, number, o.instruction_column),
                input_block=o.input_template.format(input=inp) if inp else "",
            )
            answer = cell_text(row[o.output_column], where, number, o.output_column)
            answers_seen = answers_seen or bool(answer.strip())
            prompt_ids = bos + tok(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + eos
            if not answer_ids:
                empty += 1  # no response and no EOS token: nothing to learn from this row
                continue
            ids = (prompt_ids + answer_ids)[: o.max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: o.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                too_long += 1  # the prompt alone fills max_length: nothing to learn from this row
                continue
            examples.append({"input_ids": ids, "labels": labels})
        if not answers_seen:
            raise DataError(f"{where}: column '{o.output_column}' is empty in every row, so there is no response to learn")
        if not examples and too_long:
            raise DataError(
                f"{context.config_path}.max_length: every prompt in {path.name} is at least {o.max_length} tokens, "
                "so no row has a response to learn; raise max_length"
            )
        if not examples:
            raise DataError(f"{where}: no row has a response to learn")
        reasons = [f"{too_long} with a prompt of at least max_length={o.max_length} tokens"] if too_long else []
        reasons += [f"{empty} with an empty response"] if empty else []
        _check_kept(context, o, path, len(rows), len(examples), ", ".join(reasons))
        train, evaluation = _split(examples, o, context.seed)
        return DataSplits(train, evaluation, rows=len(rows), dropped=too_long + empty)


@attrs.define
class TextOptions(DataOptions):
    """Column holding the text (plain .txt files have one line a row in column ``text``)."""

    text_column: str = "text"


class Text(_FileFormat):
    """Plain text for causal-LM training, concatenated and cut into max_length blocks."""

    name = "text"
    Options = TextOptions
    tasks = ("causal_lm",)

    def load(self, context: DataContext) -> DataSplits:
        o = self.options
        path = _resolve(context, o.path)
        rows = _limit(read_rows(path, f"{context.config_path}.path"), o.max_examples)
        require_columns(rows, [o.text_column], path, f"{context.config_path}.path")
        where = f"{context.config_path}.path: {path.name}"
        cells = [cell_text(t, where, number, o.text_column) for number, t in enumerate(rows[o.text_column], start=1)]
        if not any(cell.strip() for cell in cells):
            raise DataError(f"{where}: column '{o.text_column}' is empty in every row")
        text = "\n".join(cell for cell, raw in zip(cells, rows[o.text_column]) if raw is not None)
        ids = context.tokenizer(text, add_special_tokens=False)["input_ids"]
        n_blocks = len(ids) // o.max_length
        if n_blocks == 0:
            raise DataError(
                f"{context.config_path}.path: {path.name} has {len(ids)} tokens, fewer than one block of max_length={o.max_length}"
            )
        blocks = [ids[i * o.max_length : (i + 1) * o.max_length] for i in range(n_blocks)]
        examples = [{"input_ids": b, "labels": list(b)} for b in blocks]
        train, evaluation = _split(examples, o, context.seed)
        return DataSplits(train, evaluation, rows=len(rows))


@attrs.define
class ClassificationOptions(DataOptions):
    """Columns of a sequence-classification dataset (labels: integers or strings)."""

    text_column: str = "text"
    label_column: str = "label"


class Classification(_FileFormat):
    """A text column and a label column, for sequence classification (e.g. BERT)."""

    name = "classification"
    Options = ClassificationOptions
    tasks = ("seq_cls",)

    def load(self, context: DataContext) -> DataSplits:
        o = self.options
        path = _resolve(context, o.path)
        rows = _limit(read_rows(path, f"{context.config_path}.path"), o.max_examples)
        require_columns(rows, [o.text_column, o.label_column], path, f"{context.config_path}.path")
        where = f"{context.config_path}.path: {path.name}"
        raw_labels = [_label(label, where, number, o.label_column) for number, label in enumerate(rows[o.label_column], start=1)]
        if any(label is None for label in raw_labels):
            raise DataError(f"{context.config_path}.path: {path.name} has rows without a label in column '{o.label_column}'")
        if all(isinstance(label, int) and not isinstance(label, bool) for label in raw_labels):
            if min(raw_labels) < 0:
                raise DataError(f"{context.config_path}.path: {path.name}: integer labels must be >= 0")
            label_ids, num_labels = list(raw_labels), max(raw_labels) + 1
        else:
            names = sorted({str(label) for label in raw_labels})
            index = {name: i for i, name in enumerate(names)}
            label_ids, num_labels = [index[str(label)] for label in raw_labels], len(names)
        if num_labels < 2:
            raise DataError(f"{context.config_path}.path: {path.name} has a single label class; classification needs at least 2")
        texts = [cell_text(text, where, number, o.text_column) for number, text in enumerate(rows[o.text_column], start=1)]
        if not any(text.strip() for text in texts):
            raise DataError(f"{where}: column '{o.text_column}' is empty in every row")
        examples = []
        for text, label in zip(texts, label_ids):
            ids = context.tokenizer(text, truncation=True, max_length=o.max_length)["input_ids"]
            examples.append({"input_ids": ids, "labels": label})
        train, evaluation = _split(examples, o, context.seed)
        return DataSplits(train, evaluation, num_labels=num_labels, rows=len(rows))


def _label(value: Any, where: str, row: int, column: str) -> Any:
    """A class label as written (an integer or text); None when missing (also a NaN from an empty
    csv field); integral floats (csv columns with a missing value) become integers. Lists,
    mappings, booleans and fractional numbers are refused."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise DataError(f"{where} row {row} column '{column}': expected an integer or text label, got {_kind(value)} ({short_repr(value, 40)})")


@hookimpl
def register_data_formats(register):
    register(Instruction)
    register(Text)
    register(Classification)
