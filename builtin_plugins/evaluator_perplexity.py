"""Builtin evaluator ``perplexity``: token-weighted mean negative log-likelihood of a held-out
file, and its perplexity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import attrs

from qlora_plugins import EvalContext, Evaluator, hookimpl
from qlora_plugins.errors import EvaluationError, short_text
from qlora_plugins.evaluation import token_weighted_perplexity
from qlora_plugins.inference import has_chat_template, render_conversation
from qlora_plugins.options import in_range, positive

#: Held-out files larger than this are refused before they are read.
MAX_BYTES = 256 << 20
SUFFIXES = (".txt", ".text", ".jsonl")


@attrs.define
class PerplexityOptions:
    """``path``: the held-out file (``.txt``: one text a line; ``.jsonl``: one object a line with a
    ``field`` text or ``messages`` in the chat data format); ``window``: tokens scored together
    (longer texts are cut into consecutive windows); ``max_examples``: use the first N texts."""

    path: str
    field: str = "text"
    window: int = attrs.field(default=256, validator=in_range(2, 1_000_000))
    max_examples: Optional[int] = attrs.field(default=None, validator=positive)


class Perplexity(Evaluator):
    """Perplexity on a held-out text or jsonl file (token-weighted mean NLL)."""

    name = "perplexity"
    Options = PerplexityOptions

    def _file(self, base_dir: Path, config_path: str) -> Path:
        path = Path(base_dir) / Path(self.options.path).expanduser()
        where = f"{config_path}.path"
        try:
            if not path.exists():
                raise EvaluationError(f"{where}: held-out file not found: {path}")
            if not path.is_file():
                raise EvaluationError(f"{where}: not a file: {path}")
            if path.suffix.lower() not in SUFFIXES:
                raise EvaluationError(f"{where}: {path.name}: unsupported file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
            if path.stat().st_size > MAX_BYTES:
                raise EvaluationError(f"{where}: {path} is larger than {MAX_BYTES >> 20} MiB")
        except OSError as exc:
            raise EvaluationError(f"{where}: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None
        return path

    def check(self, base_dir: Path, config_path: str = "eval") -> None:
        self._file(base_dir, config_path)

    def _texts(self, path: Path, context: EvalContext) -> list[str]:
        where = f"{context.config_path}.path"
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise EvaluationError(f"{where}: {path} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise EvaluationError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if path.suffix.lower() != ".jsonl":
            texts = [line for _, line in lines]
        else:
            chat = context.chat and has_chat_template(context.tokenizer)
            texts = [self._row_text(n, line, path, where, context.tokenizer, chat) for n, line in lines]
        if self.options.max_examples:
            texts = texts[: self.options.max_examples]
        if not texts:
            raise EvaluationError(f"{where}: {path} holds no text")
        return texts

    def _row_text(self, number: int, line: str, path: Path, where: str, tokenizer: Any, chat: bool) -> str:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise EvaluationError(f"{where}: {path} line {number}: not JSON ({short_text(str(exc), 100)})") from None
        if isinstance(row, dict) and isinstance(row.get(self.options.field), str):
            return row[self.options.field]
        messages = row.get("messages") if isinstance(row, dict) else None
        if isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return render_conversation(tokenizer, messages, chat)
        raise EvaluationError(f"{where}: {path} line {number}: no '{self.options.field}' text and no 'messages'")

    def evaluate(self, context: EvalContext) -> dict:
        path = self._file(context.base_dir, context.config_path)
        tokenizer = context.tokenizer
        sequences = []
        for text in self._texts(path, context):
            ids = list(tokenizer(text)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)  # the end of the text is part of what is predicted
            sequences.append(ids)
        return token_weighted_perplexity(context.model, sequences, self.options.window)


@hookimpl
def register_evaluators(register):
    register(Perplexity)
