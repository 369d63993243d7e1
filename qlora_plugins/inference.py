"""Generation and loading for inference, for commands and evaluators (``qlora generate``,
``qlora chat``, ``qlora eval``)::

    from qlora_plugins.api import create_registry
    from qlora_plugins.inference import Sampling, answer, load_target

    target = load_target("runs/quickstart", create_registry())
    text = answer(target.model, target.tokenizer, [{"role": "user", "content": "Hello"}], target.chat, Sampling(max_new_tokens=20))

A target is a run directory, an export directory or a model directory (see
:mod:`qlora_plugins.core.inference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from qlora_plugins.core.inference import (
    MAX_PROMPTS_BYTES,
    TEMPLATE_MODES,
    Sampling,
    Target,
    answer,
    append_conversation,
    generate,
    has_chat_template,
    is_conversational,
    kind_of,
    model_task,
    read_prompts,
    render_conversation,
    render_messages,
    sampling_from_flags,
    stop_token_ids,
    turn_terminator,
    use_chat_template,
)

#: Names of data formats whose runs trained on conversations even when their class does not
#: declare ``conversational = True`` (the chat template is then applied by default).
CHAT_DATA_FORMATS: tuple[str, ...] = ("chat",)


def load_target(
    path: str | Path, registry: Any, log: Callable[[str], None] = lambda m: None, chat_formats: Sequence[str] = CHAT_DATA_FORMATS
) -> Target:
    """Load a run directory, an export directory or a model directory for generation or
    evaluation (:func:`qlora_plugins.core.inference.load_target`).

    :raises qlora_plugins.errors.TargetError: not one of those, or it cannot be loaded.
    """
    from qlora_plugins.core.inference import load_target as _load

    return _load(Path(path), registry, log, chat_formats)


__all__ = [
    "CHAT_DATA_FORMATS",
    "MAX_PROMPTS_BYTES",
    "TEMPLATE_MODES",
    "Sampling",
    "Target",
    "answer",
    "append_conversation",
    "generate",
    "has_chat_template",
    "is_conversational",
    "kind_of",
    "load_target",
    "model_task",
    "read_prompts",
    "render_conversation",
    "render_messages",
    "sampling_from_flags",
    "stop_token_ids",
    "turn_terminator",
    "use_chat_template",
]
