"""Builtin data formats: ``instruction`` (prompt masked from the loss), ``text`` (plain causal-LM
text cut into blocks) and ``classification`` (a text column and a label column)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import attrs

from qlora_plugins import DataContext, DataFormat, DataOptions, DataSplits, hookimpl
from qlora_plugins.data import check_data_file, read_rows, require_columns, split_indices
from qlora_plugins.errors import DataError

IGNORE_INDEX = -100


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
        problem = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else f"invalid format string ({exc})"
        raise ValueError(f"{problem}; it may use {allowed} (double braces for literal ones)", attribute) from None
    for name in names:
        if name not in fields:
            raise ValueError(f"placeholder {{{name}}} may only name a field, not its attributes or items; it may use {allowed}", attribute)


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
        examples, dropped = [], 0
        for row in rows:
            inp = (row.get(o.input_column) or "") if has_input else ""
            prompt = o.template.format(
                instruction=row[o.instruction_column] or "",
                input_block=o.input_template.format(input=inp) if inp else "",
            )
            prompt_ids = bos + tok(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tok(str(row[o.output_column] or ""), add_special_tokens=False)["input_ids"] + eos
            ids = (prompt_ids + answer_ids)[: o.max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: o.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1  # the prompt alone fills max_length: nothing to learn from this row
                continue
            examples.append({"input_ids": ids, "labels": labels})
        if not examples:
            raise DataError(
                f"{context.config_path}.max_length: every prompt in {path.name} is at least {o.max_length} tokens, "
                "so no row has a response to learn; raise max_length"
            )
        train, evaluation = _split(examples, o, context.seed)
        return DataSplits(train, evaluation)


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
        text = "\n".join(str(t) for t in rows[o.text_column] if t is not None)
        ids = context.tokenizer(text, add_special_tokens=False)["input_ids"]
        n_blocks = len(ids) // o.max_length
        if n_blocks == 0:
            raise DataError(f"{context.config_path}.path: {path.name} has {len(ids)} tokens, fewer than one block of max_length={o.max_length}")
        blocks = [ids[i * o.max_length : (i + 1) * o.max_length] for i in range(n_blocks)]
        examples = [{"input_ids": b, "labels": list(b)} for b in blocks]
        train, evaluation = _split(examples, o, context.seed)
        return DataSplits(train, evaluation)


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
        raw_labels = rows[o.label_column]
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
        examples = []
        for text, label in zip(rows[o.text_column], label_ids):
            ids = context.tokenizer(str(text or ""), truncation=True, max_length=o.max_length)["input_ids"]
            examples.append({"input_ids": ids, "labels": label})
        train, evaluation = _split(examples, o, context.seed)
        return DataSplits(train, evaluation, num_labels=num_labels)


@hookimpl(trylast=True)
def register_data_formats(register):
    register(Instruction)
    register(Text)
    register(Classification)
