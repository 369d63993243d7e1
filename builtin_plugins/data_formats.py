"""Builtin data formats: ``instruction`` (prompt masked from the loss), ``text`` (plain causal-LM
text cut into blocks) and ``classification`` (a text column and a label column).

Each tokenizes through :func:`qlora_plugins.data.tokenize_cached`: batched, in worker processes
for big files, kept as memory-mapped Arrow and cached (docs/data-cache.md)."""

from __future__ import annotations

import functools
import math
import string
from pathlib import Path
from typing import Any

import attrs

from qlora_plugins import DataContext, DataFormat, DataOptions, DataSplits, hookimpl
from qlora_plugins.data import Encoder, check_data_file, code_fingerprint, require_columns, split_examples, tokenize_cached
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


_KEPT, _TOO_LONG, _EMPTY = 0, 1, 2
_IDS = ["int32"]


def _features(**columns: Any) -> Any:
    """``datasets.Features`` from ``name=dtype`` (a list of one dtype: a list column)."""
    import datasets

    return datasets.Features(
        {
            name: datasets.Sequence(datasets.Value(kind[0])) if isinstance(kind, list) else datasets.Value(kind)
            for name, kind in columns.items()
        }
    )


def _tokenize(fmt: DataFormat, context: DataContext, path: Path, prepare: Any) -> Any:
    """Tokenize ``path`` through the cache with the format's options and code as part of the key."""
    o = fmt.options
    return tokenize_cached(
        [path],
        prepare,
        tokenizer=context.tokenizer,
        name=fmt.name,
        options=o,
        code=code_fingerprint(type(fmt)),
        config_path=context.config_path,
        max_examples=o.max_examples,
        num_proc=o.num_proc,
        cache=o.cache,
    )


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
        where = f"{context.config_path}.path: {path.name}"
        tok = context.tokenizer

        def prepare(rows: Any) -> Encoder:
            require_columns(rows, [o.instruction_column, o.output_column], path, f"{context.config_path}.path")
            has_input = o.input_column in rows.column_names
            encode = functools.partial(_encode_instruction, o=o, tok=tok, where=where, has_input=has_input)
            return Encoder(encode, features=_features(input_ids=_IDS, labels=_IDS, status="int8", answered="bool"))

        data = _tokenize(self, context, path, prepare)
        status = data.column("status")
        too_long, empty = int((status == _TOO_LONG).sum()), int((status == _EMPTY).sum())
        kept = status == _KEPT
        if not data.column("answered").any():
            raise DataError(f"{where}: column '{o.output_column}' is empty in every row, so there is no response to learn")
        if not kept.any() and too_long:
            raise DataError(
                f"{context.config_path}.max_length: every prompt in {path.name} is at least {o.max_length} tokens, "
                "so no row has a response to learn; raise max_length"
            )
        if not kept.any():
            raise DataError(f"{where}: no row has a response to learn")
        reasons = [f"{too_long} with a prompt of at least max_length={o.max_length} tokens"] if too_long else []
        reasons += [f"{empty} with an empty response"] if empty else []
        _check_kept(context, o, path, data.rows, int(kept.sum()), ", ".join(reasons))
        train, evaluation = split_examples(data, kept, o.eval_fraction, context.seed)
        return DataSplits(train, evaluation, rows=data.rows, dropped=too_long + empty)


def _encode_instruction(batch: dict, indices: list, *, o: Any, tok: Any, where: str, has_input: bool) -> dict:
    """One batch of instruction rows: prompt and answer tokens, the prompt masked; a row whose
    prompt fills max_length, or without a response and EOS, is kept with a drop status."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
    prompts, answers = [], []
    for k, index in enumerate(indices):
        number = index + 1
        inp = cell_text(batch[o.input_column][k], where, number, o.input_column) if has_input else ""
        prompts.append(
            o.template.format(
                instruction=cell_text(batch[o.instruction_column][k], where, number, o.instruction_column),
                input_block=o.input_template.format(input=inp) if inp else "",
            )
        )
        answers.append(cell_text(batch[o.output_column][k], where, number, o.output_column))
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    answer_ids = tok(answers, add_special_tokens=False)["input_ids"] if answers else []
    out: dict = {"input_ids": [], "labels": [], "status": [], "answered": []}
    for answer, p_ids, a_ids in zip(answers, prompt_ids, answer_ids):
        p_ids, a_ids = bos + list(p_ids), list(a_ids) + eos
        ids = (p_ids + a_ids)[: o.max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + a_ids)[: o.max_length]
        if not a_ids:
            status = _EMPTY  # no response and no EOS token: nothing to learn from this row
        elif all(label == IGNORE_INDEX for label in labels):
            status = _TOO_LONG  # the prompt alone fills max_length: nothing to learn from this row
        else:
            status = _KEPT
        keep = status == _KEPT
        out["input_ids"].append(ids if keep else [])
        out["labels"].append(labels if keep else [])
        out["status"].append(status)
        out["answered"].append(bool(answer.strip()))
    return out


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
        where = f"{context.config_path}.path: {path.name}"
        tok = context.tokenizer

        def prepare(rows: Any) -> Encoder:
            require_columns(rows, [o.text_column], path, f"{context.config_path}.path")
            facts: dict = {"tokens": 0, "nonblank": False}
            separator = list(tok("\n", add_special_tokens=False)["input_ids"])
            return Encoder(
                functools.partial(_encode_text, column=o.text_column, tok=tok, where=where),
                meta=facts,
                regroup=_Blocks(o.max_length, separator, facts),
                features=_features(ids=_IDS, present="bool", nonblank="bool"),
                regroup_features=_features(input_ids=_IDS),
            )

        data = _tokenize(self, context, path, prepare)
        if not data.meta["nonblank"]:
            raise DataError(f"{where}: column '{o.text_column}' is empty in every row")
        if len(data.dataset) == 0:
            raise DataError(
                f"{context.config_path}.path: {path.name} has {data.meta['tokens']} tokens, "
                f"fewer than one block of max_length={o.max_length}"
            )
        train, evaluation = split_examples(data, None, o.eval_fraction, context.seed, ("input_ids",), {"labels": "input_ids"})
        return DataSplits(train, evaluation, rows=data.rows)


def _encode_text(batch: dict, indices: list, *, column: str, tok: Any, where: str) -> dict:
    """The tokens of each row's text (a missing cell is no text and no line)."""
    raw = batch[column]
    cells = [cell_text(value, where, index + 1, column) for value, index in zip(raw, indices)]
    ids = tok(cells, add_special_tokens=False)["input_ids"] if cells else []
    return {"ids": [list(i) for i in ids], "present": [value is not None for value in raw], "nonblank": [bool(c.strip()) for c in cells]}


class _Blocks:
    """The sequential pass of ``text``: the rows' tokens joined by the newline's tokens (as the
    text joined by newlines) and cut into ``max_length`` blocks; the last partial block is
    dropped. Records the token count and whether any row holds text in ``facts``."""

    def __init__(self, max_length: int, separator: list, facts: dict) -> None:
        self.max_length, self.separator, self.facts = max_length, separator, facts
        self.carry: list = []
        self.started = False

    def __call__(self, batch: dict) -> dict:
        blocks = []
        for ids, present, nonblank in zip(batch["ids"], batch["present"], batch["nonblank"]):
            self.facts["nonblank"] = self.facts["nonblank"] or bool(nonblank)
            if not present:
                continue
            added = (self.separator if self.started else []) + list(ids)
            self.started = True
            self.facts["tokens"] += len(added)
            self.carry.extend(added)
            while len(self.carry) >= self.max_length:
                blocks.append(self.carry[: self.max_length])
                del self.carry[: self.max_length]
        return {"input_ids": blocks}


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
        where = f"{context.config_path}.path: {path.name}"
        tok = context.tokenizer

        def prepare(rows: Any) -> Encoder:
            require_columns(rows, [o.text_column, o.label_column], path, f"{context.config_path}.path")
            raw_labels = [_label(label, where, number, o.label_column) for number, label in enumerate(rows[o.label_column], start=1)]
            if any(label is None for label in raw_labels):
                raise DataError(f"{context.config_path}.path: {path.name} has rows without a label in column '{o.label_column}'")
            index: dict | None = None
            if all(isinstance(label, int) and not isinstance(label, bool) for label in raw_labels):
                if min(raw_labels) < 0:
                    raise DataError(f"{context.config_path}.path: {path.name}: integer labels must be >= 0")
                num_labels = max(raw_labels) + 1
            else:
                names = sorted({str(label) for label in raw_labels})
                index, num_labels = {name: i for i, name in enumerate(names)}, len(names)
            if num_labels < 2:
                raise DataError(f"{context.config_path}.path: {path.name} has a single label class; classification needs at least 2")
            encode = functools.partial(_encode_classification, o=o, tok=tok, where=where, index=index)
            return Encoder(encode, meta={"num_labels": num_labels}, features=_features(input_ids=_IDS, labels="int64", nonblank="bool"))

        data = _tokenize(self, context, path, prepare)
        if not data.column("nonblank").any():
            raise DataError(f"{where}: column '{o.text_column}' is empty in every row")
        train, evaluation = split_examples(data, None, o.eval_fraction, context.seed)
        return DataSplits(train, evaluation, num_labels=data.meta["num_labels"], rows=data.rows)


def _encode_classification(batch: dict, indices: list, *, o: Any, tok: Any, where: str, index: dict | None) -> dict:
    """One batch of classification rows: the text's tokens (truncated) and the label's index."""
    texts = [cell_text(text, where, i + 1, o.text_column) for text, i in zip(batch[o.text_column], indices)]
    ids = tok(texts, truncation=True, max_length=o.max_length)["input_ids"] if texts else []
    labels = [_label(label, where, i + 1, o.label_column) for label, i in zip(batch[o.label_column], indices)]
    return {
        "input_ids": [list(i) for i in ids],
        "labels": [index[str(label)] if index is not None else label for label in labels],
        "nonblank": [bool(text.strip()) for text in texts],
    }


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
