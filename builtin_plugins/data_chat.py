"""Builtin data format ``chat``: multi-turn conversations rendered with a chat template, the loss
on the assistant turns.

Rows hold a list of messages, OpenAI style (``messages: [{role, content}]``) or ShareGPT style
(``conversations: [{from, value}]``); field and role names are options. A conversation is
rendered with the tokenizer's own chat template, a builtin one (``template: chatml``; see
``chat_templates.py``) or a Jinja file (``template_file``), tokenized once, and the trained
tokens are found without ``{% generation %}`` markers:

* an assistant turn starts where the template's generation prompt for the conversation so far
  ends (``add_generation_prompt=True`` on the messages before it), and ends where the rendering
  of the conversation up to and including it ends; both renderings must be prefixes of the whole
  conversation's rendering (a template that renders earlier turns differently is refused for the
  row). A template that appends something only after the last message (Phi-3's EOS) is
  recognised: that tail is not part of the earlier turns;
* whitespace after a turn terminator (the template's ``stops``, the tokenizer's special tokens or
  EOS) is the separator before the next turn and is not trained;
* the character spans are mapped to tokens of the one tokenization of the whole conversation:
  a token is trained when it overlaps a span, so a token that straddles the start of an
  assistant turn (a space merged with its first word) is trained. Token boundaries come from the
  tokenizer's offsets when they are unambiguous and otherwise from tokenizing the prefix of the
  text up to the boundary, which works for any tokenizer.

:meth:`ChatEncoder.encode_row` is the per-row function (row mapping -> example columns or a drop
reason), so a batched ``datasets.map`` can wrap it.
"""

from __future__ import annotations

import bisect
import functools
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import attrs

from qlora_plugins import DataContext, DataFormat, DataOptions, DataSplits, hookimpl
from qlora_plugins.builtin_plugins import chat_templates as template_source_module
from qlora_plugins.builtin_plugins.chat_templates import TEMPLATES
from qlora_plugins.data import Encoder, Examples, check_data_file, code_fingerprint, require_columns, split_indices, tokenize_cached
from qlora_plugins.errors import DataError, short_repr, short_text
from qlora_plugins.options import closest

IGNORE_INDEX = -100
CANONICAL_ROLES = ("system", "user", "assistant")
#: Role names understood without configuration: OpenAI's and ShareGPT's.
DEFAULT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
TRAIN_ON = ("assistant", "last_assistant", "all")
#: Largest template file read (a chat template is a few KiB).
TEMPLATE_FILE_LIMIT = 1 << 20


class RowError(Exception):
    """A row that cannot become a training example; the loader adds the file and line."""


def _one_line(text: object, limit: int = 200) -> str:
    return short_text(" ".join(str(text).split()), limit)


def _check_roles(instance: Any, attribute: attrs.Attribute, value: dict) -> None:
    for name, role in value.items():
        if not isinstance(name, str) or role not in CANONICAL_ROLES:
            raise ValueError(
                f"maps a role name to one of {', '.join(CANONICAL_ROLES)}; got {short_repr(name)}: {short_repr(role)}", attribute
            )


def _check_template(instance: Any, attribute: attrs.Attribute, value: Optional[str]) -> None:
    if value is not None and value not in TEMPLATES:
        match = closest(value, TEMPLATES)
        hint = f" (did you mean '{match}'?)" if match else ""
        raise ValueError(f"unknown template {short_repr(value)}{hint}; builtin templates: {', '.join(TEMPLATES)}", attribute)


@attrs.define
class ChatOptions(DataOptions):
    """Where the conversations are in a row, how to render them and which tokens to train.

    ``messages_field``/``role_field``/``content_field`` left unset find OpenAI style
    (``messages``, ``role``, ``content``) or ShareGPT style (``conversations``, ``from``,
    ``value``). ``roles`` adds role names (``{bot: assistant}``) to the known ones.
    """

    messages_field: Optional[str] = None
    role_field: Optional[str] = None
    content_field: Optional[str] = None
    roles: dict = attrs.field(factory=dict, validator=_check_roles)
    system_prompt: Optional[str] = None
    system_field: Optional[str] = None
    template: Optional[str] = attrs.field(default=None, validator=_check_template)
    template_file: Optional[str] = None
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"

    def __attrs_post_init__(self) -> None:
        if self.template is not None and self.template_file is not None:
            raise ValueError("give data.template or data.template_file, not both", attrs.fields(ChatOptions).template_file)


def _resolve(base_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def read_template_file(path: Path, config_path: str) -> str:
    """The text of a Jinja template file, with one-line errors naming ``config_path``."""
    try:
        if not path.is_file():
            raise DataError(f"{config_path}: template file not found: {path}")
        with open(path, "rb") as fh:
            data = fh.read(TEMPLATE_FILE_LIMIT + 1)
    except OSError as exc:
        raise DataError(f"{config_path}: cannot read {short_text(path, 200)}: {exc.strerror or exc}") from None
    if len(data) > TEMPLATE_FILE_LIMIT:
        raise DataError(f"{config_path}: {path.name} is larger than {TEMPLATE_FILE_LIMIT >> 20} MiB; a chat template is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{config_path}: {path} is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{config_path}: {path} is empty")
    return text


# --- rows -> messages ---------------------------------------------------------------------------


def _field(message: Mapping, configured: Optional[str], defaults: tuple[str, str]) -> Any:
    if configured is not None:
        return message.get(configured)
    first = message.get(defaults[0])
    return first if first is not None else message.get(defaults[1])


@attrs.define
class RowReader:
    """Turns a row into canonical messages (``role`` in system/user/assistant, ``content``)."""

    messages_field: str
    role_field: Optional[str] = None
    content_field: Optional[str] = None
    roles: dict = attrs.field(factory=lambda: dict(DEFAULT_ROLES))
    system_prompt: Optional[str] = None
    system_field: Optional[str] = None

    def messages(self, row: Mapping) -> list[dict]:
        """The conversation of ``row``; raises :class:`RowError` for anything else."""
        return self.conversation(row)[0]

    def conversation(self, row: Mapping) -> tuple[list[dict], int]:
        """``(messages, added)``: the conversation of ``row`` and how many messages were put
        before the row's own (1 for a system prompt from the options, else 0)."""
        if not isinstance(row, Mapping):
            raise RowError(f"expected an object with field '{self.messages_field}', got {short_repr(row, 60)}")
        conversation = row.get(self.messages_field)
        if not isinstance(conversation, (list, tuple)):
            got = "nothing" if conversation is None else short_repr(conversation, 60)
            raise RowError(f"field '{self.messages_field}' is not a conversation (a list of messages); got {got}")
        if not conversation:
            raise RowError(f"field '{self.messages_field}' is an empty conversation")
        out = []
        role_name = self.role_field or "role/from"
        content_name = self.content_field or "content/value"
        for number, message in enumerate(conversation, start=1):
            if not isinstance(message, Mapping):
                raise RowError(f"message {number} is not an object with a role and a content; got {short_repr(message, 60)}")
            role = _field(message, self.role_field, ("role", "from"))
            if not isinstance(role, str):
                raise RowError(f"message {number} has no role (field {role_name})")
            canonical = self.roles.get(role)
            if canonical is None:
                known = ", ".join(sorted(self.roles))
                match = closest(role, self.roles)
                hint = f" (did you mean '{match}'?)" if match else ""
                raise RowError(
                    f"message {number}: unknown role {short_repr(role, 40)}{hint}; known roles: {known} (add more with data.roles)"
                )
            content = _field(message, self.content_field, ("content", "value"))
            if content is None:
                raise RowError(f"message {number} ({canonical}) has no content (field {content_name})")
            if not isinstance(content, str):
                raise RowError(f"message {number} ({canonical}): content must be text, got {short_repr(content, 40)}")
            out.append({"role": canonical, "content": content})
        if out[0]["role"] != "system":
            system = row.get(self.system_field) if self.system_field else None
            if system is not None and not isinstance(system, str):
                raise RowError(f"field '{self.system_field}' must be text, got {short_repr(system, 40)}")
            system = system or self.system_prompt
            if system:
                out.insert(0, {"role": "system", "content": system})
                return out, 1
        return out, 0


# --- messages -> tokens -------------------------------------------------------------------------


class _Tokens:
    """One tokenization of the rendered text, and token boundaries for character positions."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.tokenizer, self.text = tokenizer, text
        fast = bool(getattr(tokenizer, "is_fast", False))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        self.ids: list[int] = list(enc["input_ids"])
        self.offsets: list[tuple[int, int]] | None = [tuple(o) for o in enc["offset_mapping"]] if fast else None
        self.ends = [end for _, end in self.offsets] if self.offsets is not None else None
        self._prefix: dict[int, tuple[int, bool]] = {}

    def boundary(self, pos: int) -> tuple[int, bool]:
        """``(k, exact)``: with ``exact``, the first ``k`` tokens are exactly ``text[:pos]``;
        otherwise token ``k`` straddles ``pos``."""
        if pos <= 0:
            return 0, True
        n = len(self.ids)
        if pos >= len(self.text):
            return n, True
        if self.offsets is not None and self.ends is not None:
            k = bisect.bisect_right(self.ends, pos)
            before_ok = k > 0 and self.ends[k - 1] == pos and self.offsets[k - 1][0] < pos
            after_ok = k < n and self.offsets[k][0] == pos and self.offsets[k][1] > pos
            if before_ok and after_ok:
                return k, True
        return self._by_prefix(pos)

    def _by_prefix(self, pos: int) -> tuple[int, bool]:
        """Tokenize ``text[:pos]``: a prefix of the whole tokenization means a clean boundary.
        Where they part (token ``m``), the boundary is still clean if the first tokens decode to
        exactly ``text[:pos]`` (a whitespace run at the end of the shorter text is tokenized
        differently, ``\\n\\n`` as one token instead of two); otherwise token ``m`` straddles it."""
        if pos not in self._prefix:
            head = list(self.tokenizer(self.text[:pos], add_special_tokens=False)["input_ids"])
            m = 0
            for a, b in zip(head, self.ids):
                if a != b:
                    break
                m += 1
            found = (m, True) if m == len(head) else (m, False)
            if not found[1]:
                target = self.text[:pos]
                for k in range(m, min(m + 4, len(self.ids)) + 1):
                    decoded = self.tokenizer.decode(self.ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    if decoded == target:
                        found = (k, True)
                        break
                    if len(decoded) > len(target):
                        break
            self._prefix[pos] = found
        return self._prefix[pos]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Token range ``[a, b)`` of the tokens that overlap characters ``[start, end)``."""
        a, _ = self.boundary(start)
        b, exact = self.boundary(end)
        return a, (b if exact else b + 1)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@attrs.define
class ChatEncoder:
    """Renders, tokenizes and masks one conversation.

    :param tokenizer: the model's tokenizer (fast tokenizers use offsets; others work too).
    :param template: the Jinja source of the chat template.
    :param label: how errors name the template (``template 'chatml'``).
    :param stops: turn terminators after which trailing whitespace is not trained.
    :param train_on: ``assistant``, ``last_assistant`` or ``all``.
    :param max_length: longer examples are cut to this many tokens.
    :param reader: turns rows into messages (:meth:`encode_row`).
    """

    tokenizer: Any
    template: str
    label: str
    stops: tuple[str, ...]
    train_on: str = "assistant"
    max_length: int = 256
    reader: Optional[RowReader] = None

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        """The template's text of each conversation; :class:`RowError` if it cannot render."""
        try:
            out = self.tokenizer.apply_chat_template(
                conversations, chat_template=self.template, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja2 errors, raise_exception(...) in the template, TypeErrors in it
            message = getattr(exc, "message", None) or str(exc)
            raise RowError(f"{self.label} cannot render this conversation: {type(exc).__name__}: {_one_line(message)}") from None
        if not isinstance(out, list) or not all(isinstance(text, str) for text in out):
            raise RowError(f"{self.label} did not render text")
        return out

    def turns(self, messages: list[dict]) -> list[int]:
        """Indices of the assistant messages to train (none for ``train_on: all``)."""
        if self.train_on == "all":
            return []
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise RowError(f"no assistant message to train on (data.train_on: {self.train_on})")
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        if turns[0] == 0:
            raise RowError("message 1 is an assistant message; an assistant turn must follow a system or user message")
        return turns

    def spans(self, messages: list[dict], full: str, closed: dict[int, str], tokens: _Tokens, added: int = 0) -> list[tuple[int, int]]:
        """Character spans of ``full`` to train (assistant contents and their terminators).

        :param closed: message index -> the rendering of the conversation up to and including it
            (the assistant messages that are not the last message).
        :param tokens: the tokenization of ``full``.
        :param added: messages put before the row's own (errors number messages as the row does).
        """
        if self.train_on == "all":
            return [(0, len(full))]
        turns = self.turns(messages)
        prompts = self.render([messages[:i] for i in turns], add_generation_prompt=True)
        spans = []
        for i, prompt in zip(turns, prompts):
            if not full.startswith(prompt):
                raise RowError(
                    f"{self.label} renders the prompt of message {i + 1 - added} (assistant) differently from the same turn inside the "
                    "whole conversation, so its tokens cannot be located (the template is not prefix-stable)"
                )
            start = len(prompt)
            upto = closed.get(i, full)
            end = len(upto) if full.startswith(upto) else self._before_tail(upto, full, start, i - added, tokens)
            text = full[start:end]
            stripped = text.rstrip()
            if len(stripped) < len(text) and stripped.endswith(self.stops):
                end = start + len(stripped)
            spans.append((start, end))
        return spans

    def _before_tail(self, upto: str, full: str, start: int, i: int, tokens: _Tokens) -> int:
        """Where message ``i`` ends in ``full`` when the rendering that stops after it (``upto``)
        has a tail the whole conversation has only at its end (Phi-3's EOS): the latest token
        boundary at or before the common prefix such that the rest of ``upto`` ends ``full``."""
        common = _common_prefix(upto, full)
        for pos in range(common, max(start, common - 256) - 1, -1):
            if full.endswith(upto[pos:]) and tokens.boundary(pos)[1]:
                return pos
        raise RowError(
            f"{self.label} renders message {i + 1} (assistant) differently once later messages follow, so its end cannot be "
            "located (the template is not prefix-stable)"
        )

    def encode(self, messages: list[dict], added: int = 0) -> dict:
        """Example columns of one conversation: ``input_ids``, ``labels`` (-100 where not
        trained), ``truncated`` and ``dropped`` (None, or why the conversation gives no example).
        ``added``: messages put before the row's own (for the message numbers of errors)."""
        inner = [i for i in self.turns(messages) if i + 1 < len(messages)]
        full, *closings = self.render([messages] + [messages[: i + 1] for i in inner], add_generation_prompt=False)
        tokens = _Tokens(self.tokenizer, full)
        spans = self.spans(messages, full, dict(zip(inner, closings)), tokens, added)
        ids = tokens.ids
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            if end > start:
                a, b = tokens.span(start, end)
                labels[a:b] = ids[a:b]
        trained = any(label != IGNORE_INDEX for label in labels)
        truncated = len(ids) > self.max_length
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not any(label != IGNORE_INDEX for label in labels):
            reason = "truncated" if trained else "no_trained_token"
            return {"input_ids": [], "labels": [], "truncated": truncated, "dropped": reason}
        return {"input_ids": ids, "labels": labels, "truncated": truncated, "dropped": None}

    def encode_row(self, row: Mapping) -> dict:
        """:meth:`encode` of the row's conversation (read by ``reader``); :class:`RowError` for
        a row that is not a usable conversation."""
        if self.reader is None:
            raise TypeError("ChatEncoder.encode_row needs a reader")
        return self.encode(*self.reader.conversation(row))


def special_stops(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens and EOS: every one ends a turn that ends with it."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    if getattr(tokenizer, "eos_token", None):
        found.add(tokenizer.eos_token)
    return tuple(sorted(t for t in found if t))


def template_of(options: ChatOptions, tokenizer: Any, base_dir: Path, config_path: str = "data") -> tuple[str, str, tuple[str, ...]]:
    """``(source, label, stops)`` of the template the options name (the tokenizer's own when
    none)."""
    if options.template is not None:
        template = TEMPLATES[options.template]
        return template.source, f"template '{template.name}'", template.stops
    if options.template_file is not None:
        path = _resolve(base_dir, options.template_file)
        return read_template_file(path, f"{config_path}.template_file"), f"template file {path.name}", ()
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default")
    if not isinstance(source, str) or not source.strip():
        raise DataError(
            f"{config_path}.template: the model's tokenizer has no chat template; name a builtin one "
            f"({', '.join(TEMPLATES)}) or give data.template_file"
        )
    return source, "the tokenizer's chat template", ()


def check_compiles(tokenizer: Any, source: str, where: str) -> None:
    """Refuse a template with a Jinja syntax error before any row is read."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=source, tokenize=False)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"{where}: Jinja syntax error on line {exc.lineno}: {_one_line(exc.message)}") from None
    except Exception:  # noqa: BLE001 - a template may refuse this probe (e.g. it wants a system message); rows will say
        return


# --- the data format ----------------------------------------------------------------------------


class _Locator:
    """``line N`` (JSON lines: the file's line) or ``row N`` for the i-th row read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[int] | None = None

    def __call__(self, index: int) -> str:
        if self.path.suffix.lower() != ".jsonl":
            return f"row {index + 1}"
        if self.lines is None:
            self.lines = []
            try:
                with open(self.path, "rb") as fh:
                    for number, line in enumerate(fh, start=1):
                        if line.strip(b" \t\r\n"):
                            self.lines.append(number)
            except OSError:
                pass
        return f"line {self.lines[index]}" if index < len(self.lines) else f"row {index + 1}"


def _diagnose_jsonl(path: Path, reader: RowReader, auto_field: bool) -> str | None:
    """The first line of a JSON-lines file that is not a conversation (the reason datasets
    could not read the file as a table), as ``line N: why``; None if every line is one. With
    ``auto_field`` each row's own ``messages`` or ``conversations`` field is read."""
    import json

    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip(b" \t\r\n"):
                    continue
                try:
                    row = json.loads(raw)
                except ValueError as exc:
                    return f"line {number}: not valid JSON ({_one_line(exc, 120)})"
                if auto_field and isinstance(row, dict) and "messages" not in row and "conversations" in row:
                    row_reader = attrs.evolve(reader, messages_field="conversations")
                else:
                    row_reader = reader
                try:
                    row_reader.messages(row)
                except RowError as exc:
                    return f"line {number}: {exc}"
    except OSError:
        return None
    return None


class Chat(DataFormat):
    """Multi-turn conversations rendered with a chat template; the loss on assistant turns."""

    name = "chat"
    Options = ChatOptions
    tasks = ("causal_lm",)
    conversational = True  # qlora generate/chat/eval apply the chat template to runs trained on it

    def check(self, base_dir: Path, config_path: str = "data") -> None:
        check_data_file(_resolve(base_dir, self.options.path), f"{config_path}.path")
        if self.options.template_file is not None:
            read_template_file(_resolve(base_dir, self.options.template_file), f"{config_path}.template_file")

    def input_paths(self, base_dir: Path) -> list[Path]:
        paths = [_resolve(base_dir, self.options.path)]
        if self.options.template_file is not None:
            paths.append(_resolve(base_dir, self.options.template_file))
        return paths

    def reader(self, column_names: Sequence[str], path: Path, config_path: str) -> RowReader:
        """The row reader for a file with ``column_names``."""
        o = self.options
        field = o.messages_field
        if field is None:
            field = next((name for name in ("messages", "conversations") if name in column_names), "messages")
            if field not in column_names:
                present = short_text(", ".join(column_names), 300) or "none"
                raise DataError(
                    f"{config_path}.path: {path.name} has no column 'messages' or 'conversations' (set data.messages_field); "
                    f"it has: {present}"
                )
        return RowReader(field, o.role_field, o.content_field, {**DEFAULT_ROLES, **o.roles}, o.system_prompt, o.system_field)

    def encoder(self, context: DataContext, reader: RowReader | None = None) -> ChatEncoder:
        """The per-row encoder for ``context``'s tokenizer (``encode_row`` needs ``reader``)."""
        o, where = self.options, context.config_path
        source, label, stops = template_of(o, context.tokenizer, context.base_dir, where)
        check_compiles(context.tokenizer, source, f"{where}.template_file" if o.template_file else f"{where}.template")
        stops = tuple(sorted(set(stops) | set(special_stops(context.tokenizer))))
        return ChatEncoder(context.tokenizer, source, label, stops, o.train_on, o.max_length, reader)

    def load(self, context: DataContext) -> DataSplits:
        """Tokenize the file through the data cache (batched, in worker processes for big files,
        kept as memory-mapped Arrow; a second run or a resume reuses it), then split."""
        import numpy as np

        o, cp = self.options, context.config_path
        path = _resolve(context.base_dir, o.path)
        where = f"{cp}.path: {path.name}"

        def prepare(rows: Any) -> Encoder:
            if o.messages_field is not None:
                require_columns(rows, [o.messages_field], path, f"{cp}.path")
            encoder = self.encoder(context, self.reader(rows.column_names, path, cp))
            encode = functools.partial(_encode_conversations, encoder=encoder, where=where, locate=_Locator(path))
            return Encoder(encode, features=_chat_features())

        try:
            data = tokenize_cached(
                [path],
                prepare,
                tokenizer=context.tokenizer,
                name=self.name,
                options=o,
                code=code_fingerprint(type(self)) + code_fingerprint(template_source_module),  # (the builtin templates' text)
                config_path=cp,
                max_examples=o.max_examples,
                num_proc=o.num_proc,
                cache=o.cache,
            )
        except DataError as exc:
            if "cannot parse" in str(exc) and path.suffix.lower() == ".jsonl" and path.is_file():
                problem = _diagnose_jsonl(path, self.reader(["messages"], path, cp), o.messages_field is None)
                if problem:
                    raise DataError(f"{cp}.path: {path.name} {problem}") from None
            raise
        status = data.column("status")
        kept = status == _KEPT
        cut, empty = int((status == _CUT).sum()), int((status == _NOTHING).sum())
        n_dropped, n_kept = cut + empty, int(kept.sum())
        first_dropped = _Locator(path)(int(np.flatnonzero(~kept)[0])) if n_dropped else None
        if not n_kept:
            if cut:
                raise DataError(
                    f"{cp}.max_length: no conversation in {path.name} keeps a trained token within max_length={o.max_length} "
                    f"(first: {first_dropped}); raise max_length"
                )
            raise DataError(f"{where}: no conversation has a token to train on (data.train_on: {o.train_on}; first: {first_dropped})")
        if n_dropped and n_kept < o.min_kept_fraction * data.rows:
            reasons = [f"{cut} with no trained token within max_length={o.max_length}"] if cut else []
            reasons += [f"{empty} with nothing to train"] if empty else []
            raise DataError(
                f"{cp}.max_length: only {n_kept} of {data.rows} conversations of {path.name} are usable "
                f"({n_dropped} dropped: {', '.join(reasons)}; first: {first_dropped}); data.min_kept_fraction is "
                f"{o.min_kept_fraction:g}; raise max_length or lower min_kept_fraction"
            )
        truncated = int((data.column("truncated") & kept).sum())
        kept_rows = np.flatnonzero(kept)
        train_idx, eval_idx = split_indices(len(kept_rows), o.eval_fraction, context.seed)
        # file order: `qlora data preview` shows the first rows
        train = Examples(data.dataset, sorted(kept_rows[train_idx].tolist()))
        evaluation = Examples(data.dataset, sorted(kept_rows[eval_idx].tolist()))
        train.tokenized = evaluation.tokenized = data
        return DataSplits(train, evaluation, rows=data.rows, dropped=n_dropped, truncated=truncated)


_KEPT, _CUT, _NOTHING = 0, 1, 2
_STATUS = {None: _KEPT, "truncated": _CUT, "no_trained_token": _NOTHING}


def _chat_features() -> Any:
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "status": datasets.Value("int8"), "truncated": datasets.Value("bool")})


def _encode_conversations(batch: dict, indices: list, *, encoder: ChatEncoder, where: str, locate: _Locator) -> dict:
    """One batch of rows through :meth:`ChatEncoder.encode_row` (runs in worker processes): the
    example columns, and a status for rows that give no example (they are counted, not kept)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "truncated": []}
    columns = list(batch)
    for k, index in enumerate(indices):
        try:
            example = encoder.encode_row({name: batch[name][k] for name in columns})
        except RowError as exc:
            raise DataError(f"{where} {locate(index)}: {exc}") from None
        out["input_ids"].append(example["input_ids"])
        out["labels"].append(example["labels"])
        out["status"].append(_STATUS[example["dropped"]])
        out["truncated"].append(bool(example["truncated"]))
    return out


@hookimpl
def register_data_formats(register):
    register(Chat)
