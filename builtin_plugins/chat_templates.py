"""Builtin chat templates for the ``chat`` data format (``data.template: NAME``), written for this
project in the style of five model families' prompt formats.

Each is a Jinja template rendered by the tokenizer's ``apply_chat_template`` (the same sandboxed
environment as the model's own template: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and ``raise_exception`` are available). The templates leave the message contents as
they are (no trimming), close every turn with the family's turn terminator and render the same
prefix for a conversation and for any longer conversation that continues it, which is what the
``chat`` format's loss masking relies on (docs/data.md, "Masking").

``stops`` names each template's turn terminators: the text after an assistant turn's content that
the model must learn to produce so that it stops; whitespace the template writes after a
terminator (ChatML's newline) is not trained.
"""

from __future__ import annotations

import attrs


@attrs.define(frozen=True)
class ChatTemplate:
    """A named Jinja chat template and its turn terminators.

    :param name: the name ``data.template`` uses.
    :param source: the Jinja text.
    :param stops: turn terminators (besides the tokenizer's special tokens and EOS).
    :param description: one line for the docs and error messages.
    """

    name: str
    source: str
    stops: tuple[str, ...]
    description: str


CHATML = ChatTemplate(
    "chatml",
    (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    ("<|im_end|>",),
    "ChatML: <|im_start|>ROLE\\nCONTENT<|im_end|>\\n (Qwen, many fine-tunes)",
)

LLAMA3 = ChatTemplate(
    "llama3",
    (
        "{{- '<|begin_of_text|>' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    ("<|eot_id|>",),
    "Llama-3 style: <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>",
)

MISTRAL = ChatTemplate(
    "mistral",
    (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('roles must alternate user, assistant, user, ... after an optional first system message') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '[INST] ' + (system + '\\n\\n' if loop.first and system is not none else '') + message['content'] + ' [/INST]' -}}"
        "{%- else -%}"
        "{{- message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    (),
    "Mistral style: [INST] USER [/INST]ASSISTANT</s>, the system prompt inside the first [INST]",
)

GEMMA = ChatTemplate(
    "gemma",
    (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- if system and turns and turns[0]['role'] != 'user' -%}"
        "{{- raise_exception('a system message must be followed by a user message') -}}"
        "{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'system' -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] + '<end_of_turn>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    ),
    ("<end_of_turn>",),
    "Gemma style: <start_of_turn>user|model\\nCONTENT<end_of_turn>\\n, the system prompt inside the first user turn",
)

PHI3 = ChatTemplate(
    "phi3",
    (
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
    ),
    ("<|end|>",),
    "Phi-3 style: <|ROLE|>\\nCONTENT<|end|>\\n, EOS after the last message",
)

#: The builtin templates by name.
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (CHATML, LLAMA3, MISTRAL, GEMMA, PHI3)}

#: The marker tokens each template writes (a tokenizer for a family has them as special tokens).
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}
