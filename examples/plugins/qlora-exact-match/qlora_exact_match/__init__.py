"""A third-party evaluator plugin for qlora-plugins: the fraction of prompts whose greedy answer
starts with the expected answer. Use it with ``qlora eval RUN -e exact_match --option
path=qa.jsonl`` or in a config's ``eval`` section (``- {name: exact_match, path: qa.jsonl}``);
``qa.jsonl`` holds ``{"prompt": ..., "answer": ...}`` lines."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from qlora_plugins import EvalContext, Evaluator, hookimpl
from qlora_plugins.errors import EvaluationError
from qlora_plugins.inference import Sampling, answer
from qlora_plugins.options import in_range


@attrs.define
class ExactMatchOptions:
    """``path``: the questions (jsonl); ``max_new_tokens``: the longest answer generated."""

    path: str
    max_new_tokens: int = attrs.field(default=16, validator=in_range(1, 4096))


class ExactMatch(Evaluator):
    """Exact match: greedy answers that start with the expected answer (jsonl of prompt/answer)."""

    name = "exact_match"
    Options = ExactMatchOptions

    def check(self, base_dir: Path, config_path: str = "eval") -> None:
        if not (Path(base_dir) / self.options.path).is_file():
            raise EvaluationError(f"{config_path}.path: file not found: {Path(base_dir) / self.options.path}")

    def evaluate(self, context: EvalContext) -> dict:
        path = Path(context.base_dir) / self.options.path
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        sampling = Sampling(max_new_tokens=self.options.max_new_tokens)
        hits = 0
        for row in rows:
            messages = [{"role": "user", "content": row["prompt"]}]
            reply = answer(context.model, context.tokenizer, messages, context.chat, sampling)
            hits += reply.strip().startswith(str(row["answer"]).strip())
        return {"exact_match": hits / len(rows) if rows else 0.0, "questions": len(rows)}


@hookimpl
def register_evaluators(register):
    register(ExactMatch)
