"""Loading a finished model for inference, rendering prompts and generating text (``qlora
generate``, ``qlora chat``, ``qlora eval`` and evaluators).

A *target* is one of:

- a run directory (``config.yaml`` + ``adapter/``): the base loaded through the run's quantizer
  (4-bit, as trained) with the trained adapter attached, through the same pipeline stages as
  ``qlora export`` (:func:`~qlora_plugins.core.exporting.finished_run.load_run`);
- an export directory (``manifest.json``): a checkpoint (``config.json``: merged, 4-bit merged,
  anything :func:`~qlora_plugins.core.checkpoint_format.load_model_checkpoint` reads) or an
  adapter, attached to the base named by the run config the manifest records;
- a model directory (``config.json`` + weights).

The base model of a run or export (``--compare-base``) is the same model with the adapter
disabled (peft's ``disable_adapter``), or, for a merged export or an adapter that cannot be
disabled, the run's base loaded again through its quantizer.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import attrs

from qlora_plugins.core import wording
from qlora_plugins.core.errors import ConfigError, ExportError, ModelError, QloraError, TargetError, short_text
from qlora_plugins.core.options import in_range

Log = Callable[[str], None]

#: Template modes: ``auto`` applies the tokenizer's chat template when the target was trained
#: on conversations and the tokenizer has one; ``chat`` always (an error without a template);
#: ``plain`` never.
TEMPLATE_MODES = ("auto", "chat", "plain")

#: A sentinel message content used to find the text a chat template puts after a turn.
_SENTINEL = "QLORA-PLUGINS-TURN-SENTINEL"


@attrs.define
class Target:
    """A loaded model to generate with or evaluate.

    :param model: the model in eval mode (the fine-tuned one for a run or export).
    :param tokenizer: its tokenizer (with a pad token).
    :param kind: ``run``, ``export`` or ``model``.
    :param path: the target directory.
    :param task: ``causal_lm`` or ``seq_cls``.
    :param chat: True when the target was trained on conversations (its data format declares
        ``conversational = True`` or is named in ``chat_formats``).
    :param run_config: the resolved run config (None for a plain model directory).
    :param seed: the run's seed (0 for a model directory).
    :param base_loader: loads the run's base model again (None for a model directory).
    :param adapter_attached: the model is the base with the trained adapter attached (a run or
        an adapter export), so the base is the same model with the adapter disabled.
    """

    model: Any
    tokenizer: Any
    kind: str
    path: Path
    task: str
    chat: bool = False
    run_config: Optional[dict] = None
    seed: int = 0
    base_loader: Optional[Callable[[], Any]] = attrs.field(default=None, repr=False)
    adapter_attached: bool = False

    @property
    def device(self) -> str:
        """Where the model's parameters are (``cpu`` or ``cuda``)."""
        for p in self.model.parameters():
            return p.device.type
        return "cpu"

    @property
    def has_base(self) -> bool:
        """Whether there is a base model to compare with (runs and exports)."""
        return self.kind != "model"

    @contextlib.contextmanager
    def base_model(self) -> Iterator[Any]:
        """The base model (before fine-tuning) while the context is open: the same model with
        its adapter disabled when the adapter supports it, else the base loaded again."""
        if not self.has_base:
            raise TargetError(f"{self.path} is a model directory: there is no base model to compare with (give a run or an export)")
        disable = getattr(self.model, "disable_adapter", None)
        if self.adapter_attached and callable(disable):
            with disable():
                yield self.model
            return
        if self.base_loader is None:  # pragma: no cover - every run and export sets one
            raise TargetError(f"{self.path}: cannot load the base model")
        model = self.base_loader()
        try:
            yield model.eval()
        finally:
            del model


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TargetError(f"TARGET: cannot read {what} {path}: {short_text(str(exc), 200)}") from None
    if not isinstance(data, dict):
        raise TargetError(f"TARGET: {path} is not a JSON object")
    return data


def is_conversational(run_config: Optional[dict], registry: Any, chat_formats: Sequence[str] = ()) -> bool:
    """Whether the run that ``run_config`` describes trained on conversations: its data format
    class declares ``conversational = True``, or its name is one of ``chat_formats``."""
    data = (run_config or {}).get("data")
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str):
        return False
    if name in chat_formats:
        return True
    try:
        cls = registry.get("data_format", name)
    except QloraError:
        return False
    return bool(getattr(cls, "conversational", False))


def kind_of(path: Path) -> str:
    """``run``, ``export`` or ``model`` for a target directory; a TargetError (one line) for
    anything else."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:
        raise TargetError(f"TARGET: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None
    if not exists:
        raise TargetError(f"TARGET: {path} does not exist")
    if not is_dir:
        raise TargetError(f"TARGET: {path} is not a directory (give a run directory, an export directory or a model directory)")
    if (path / "config.yaml").is_file() and (path / "adapter").exists():
        return "run"
    if (path / "manifest.json").is_file():
        return "export"
    if (path / "config.json").is_file():
        return "model"
    if (path / "config.yaml").is_file():
        raise TargetError(f"TARGET: {path} is a run directory without a trained adapter (adapter/ is missing); did the run finish?")
    raise TargetError(
        f"TARGET: {path} is not a run directory (config.yaml + adapter/), an export (manifest.json) or a model directory (config.json)"
    )


def _base_loader(run_config: dict, config_file: Path, registry: Any, tokenizer: Any, device: str) -> Callable[[], Any]:
    """Loads the run's base model through its quantizer (as it was trained), on demand."""

    def load() -> Any:
        from qlora_plugins.core.exporting.finished_run import finished_config
        from qlora_plugins.core.loading import load_base, model_request
        from qlora_plugins.core.pipeline import check

        config = finished_config(run_config, config_file, with_data=False)
        checked = check(config, registry, materialize=True)
        request = model_request(config, checked.model_dir, device, config.model.num_labels)
        return load_base(checked.plugins, request, tokenizer, registry)

    return load


def load_target(path: Path, registry: Any, log: Log = lambda m: None, chat_formats: Sequence[str] = ()) -> Target:
    """Load a run directory, an export directory or a model directory (see the module
    docstring) for generation or evaluation.

    :raises TargetError: not one of those, or it cannot be loaded (one line).
    """
    from qlora_plugins.core import modeling

    path = Path(path)
    kind = kind_of(path)
    try:
        if kind == "run":
            from qlora_plugins.core.exporting.finished_run import load_run

            context = load_run(path, registry, log, with_data=False)
            config = context.config
            return _from_context(context, "run", path, config, path / "config.yaml", registry, chat_formats)
        if kind == "export":
            return _load_export(path, registry, log, chat_formats)
        modeling.check_model_dir(path, "TARGET")
        from qlora_plugins.core.checkpoint_format import load_model_checkpoint

        task = model_task(path)
        device = modeling.choose_device("auto")
        log(f"Loading the model in {path}")
        tokenizer = modeling.load_tokenizer(path)
        model = load_model_checkpoint(path, task, registry, device=device).eval()
        return Target(model, tokenizer, "model", path, task)
    except TargetError:
        raise
    except (ExportError, ModelError, ConfigError) as exc:
        raise TargetError(f"TARGET: {exc}") from None


def model_task(path: Path) -> str:
    """``seq_cls`` for a model directory whose architecture is a ``...ForSequenceClassification``,
    else ``causal_lm``."""
    config = _read_json(path / "config.json", "the model config")
    architectures = config.get("architectures") or []
    if any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures):
        return "seq_cls"
    return "causal_lm"


def _from_context(
    context: Any, kind: str, path: Path, run_config: dict, config_file: Path, registry: Any, chat_formats: Sequence[str]
) -> Target:
    model = context.model.eval()
    device = context.model_request.device
    seed = ((run_config.get("train") or {}).get("seed")) or 0
    loader = _base_loader(run_config, config_file, registry, context.tokenizer, device)
    chat = is_conversational(run_config, registry, chat_formats)
    return Target(model, context.tokenizer, kind, path, context.task, chat, run_config, int(seed), loader, adapter_attached=True)


def _load_export(path: Path, registry: Any, log: Log, chat_formats: Sequence[str]) -> Target:
    from qlora_plugins.core import modeling
    from qlora_plugins.core.checkpoint_format import load_model_checkpoint

    manifest = _read_json(path / "manifest.json", "the export manifest")
    run_config = manifest.get("config") if isinstance(manifest.get("config"), dict) else None
    task = manifest.get("task") if manifest.get("task") in ("causal_lm", "seq_cls") else "causal_lm"
    if (path / "config.json").is_file():  # a checkpoint: merged, 4-bit merged, a converted model
        device = modeling.choose_device(((run_config or {}).get("train") or {}).get("device") or "auto")
        log(f"Loading the export in {path}")
        model = load_model_checkpoint(path, task, registry, device=device).eval()
        tokenizer_dir = path if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")) else None
        if tokenizer_dir is None:
            base = (manifest.get("base_model") or {}).get("path")
            if not isinstance(base, str) or not Path(base).is_dir():
                raise TargetError(f"TARGET: {path} holds no tokenizer and its manifest names no base model directory that exists")
            tokenizer_dir = Path(base)
        tokenizer = modeling.load_tokenizer(tokenizer_dir)
        seed = int(((run_config or {}).get("train") or {}).get("seed") or 0)
        loader = _base_loader(run_config, path / "manifest.json", registry, tokenizer, device) if run_config else None
        chat = is_conversational(run_config, registry, chat_formats)
        target = Target(model, tokenizer, "export", path, task, chat, run_config, seed, loader)
        if loader is None:
            target.kind = "model"  # nothing records the base: behave like a model directory
        return target
    if run_config is None:
        raise TargetError(f"TARGET: {path}: the manifest records no run config, so the base model of this adapter is unknown")
    from qlora_plugins.core.exporting.finished_run import load_saved_adapter

    context = load_saved_adapter(run_config, path, registry, log)
    return _from_context(context, "export", path, run_config, path / "manifest.json", registry, chat_formats)


# --- prompts and chat templates ------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(target: Target, mode: str, option: str = wording.option("template")) -> bool:
    """Whether prompts for ``target`` are rendered with the chat template under ``mode``
    (:data:`TEMPLATE_MODES`)."""
    if mode not in TEMPLATE_MODES:
        raise ConfigError(option, f"must be one of {', '.join(TEMPLATE_MODES)}, got {mode!r}")
    if mode == "plain":
        return False
    if mode == "chat":
        if not has_chat_template(target.tokenizer):
            raise TargetError(f"{option} chat: the tokenizer of {target.path} has no chat template")
        return True
    return target.chat and has_chat_template(target.tokenizer)


def render_messages(tokenizer: Any, messages: Sequence[dict], chat: bool) -> list[int]:
    """Token ids of a conversation that ends with the assistant's turn to speak: the chat
    template with its generation prompt (``chat``), else plain text (a lone user message as
    is; a longer conversation as ``role: content`` lines followed by ``assistant:``)."""
    if chat:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(messages) == 1 and messages[0].get("role") == "user":
        return list(tokenizer(messages[0]["content"])["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


def render_conversation(tokenizer: Any, messages: Sequence[dict], chat: bool) -> str:
    """A whole conversation as text (for scoring, e.g. perplexity on chat rows)."""
    if chat:
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def turn_terminator(tokenizer: Any) -> Optional[str]:
    """The text the chat template writes after an assistant turn (``<|im_end|>`` for ChatML),
    found by rendering a conversation with a sentinel answer; None when there is none."""
    if not has_chat_template(tokenizer):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    except Exception:  # noqa: BLE001 - a template that cannot render this has no terminator for us
        return None
    after = text.partition(_SENTINEL)[2].strip()
    if not after:
        return None
    return after.split()[0][:64]


# --- generation ----------------------------------------------------------------------------


@attrs.define
class Sampling:
    """How to pick tokens. ``temperature`` 0 is greedy decoding (``top_p``/``top_k`` unused).

    :param max_new_tokens: the most tokens to generate.
    :param temperature: 0 (greedy) or the sampling temperature.
    :param top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches it (1: off).
    :param top_k: keep the k most likely tokens (0: off).
    :param seed: seed of the sampler (None: the target's seed).
    """

    max_new_tokens: int = attrs.field(default=128, validator=in_range(1, 100_000))
    temperature: float = attrs.field(default=0.0, validator=in_range(0.0, 100.0))
    top_p: float = attrs.field(default=1.0, validator=in_range(0.0, 1.0))
    top_k: int = attrs.field(default=0, validator=in_range(0, 1_000_000))
    seed: Optional[int] = attrs.field(default=None, validator=in_range(0, 2**32 - 1))


def sampling_from_flags(**flags: Any) -> Sampling:
    """A :class:`Sampling` from the sampling options (``max_new_tokens``, ...); a bad value is a
    ConfigError naming the option (the CLI spells it as its flag)."""
    from qlora_plugins.core.options import build_options

    values = {k: v for k, v in flags.items() if v is not None}
    if values.get("top_p") is not None and values["top_p"] <= 0.0:
        raise ConfigError(wording.option("top_p"), f"must be in (0, 1], got {values['top_p']}")
    try:
        return build_options(Sampling, values, "")
    except ConfigError as exc:
        raise ConfigError(wording.option(exc.path.strip(".")), exc.message) from None


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: list[int] = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    candidates += eos if isinstance(eos, (list, tuple)) else [eos]
    for value in candidates:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


class _TextStream:
    """A transformers streamer: decodes the new tokens as they come, calls ``on_text`` with
    each new piece, stops showing text at ``stop_text`` and holds back a tail that may be its
    beginning (or an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None], stop_text: Optional[str]) -> None:
        self.tokenizer, self.on_text, self.stop_text = tokenizer, on_text, stop_text
        self.ids: list[int] = []
        self.shown = 0
        self.text = ""
        self.stopped = False
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        visible = len(text)
        if self.stop_text:
            at = text.find(self.stop_text)
            if at >= 0:
                visible, self.stopped = at, True
            elif not final:
                for n in range(min(len(self.stop_text) - 1, len(text)), 0, -1):
                    if self.stop_text.startswith(text[-n:]):
                        visible = len(text) - n
                        break
        if not final and not self.stopped:
            while visible > 0 and text[visible - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                visible -= 1
        if visible > self.shown:
            self.on_text(text[self.shown : visible])
            self.shown = visible
        self.text = text[: max(visible, self.shown)] if not (final or self.stopped) else text[:visible]


def generate(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    sampling: Sampling,
    on_text: Callable[[str], None] = lambda text: None,
    stop_text: Optional[str] = None,
    default_seed: int = 0,
) -> str:
    """Generate a continuation of ``input_ids``, calling ``on_text`` with each new piece of
    text as it is generated; stops at an end-of-sequence token, at ``stop_text`` (a chat turn
    terminator, not included) or after ``sampling.max_new_tokens``. Returns the text."""
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = next(iter(model.parameters())).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    prompt_len = ids.shape[1]
    greedy = sampling.temperature == 0.0
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not greedy,
        "eos_token_id": stop_token_ids(model, tokenizer) or None,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    stream = _TextStream(tokenizer, on_text, stop_text)

    class StopAtText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            tail = tokenizer.decode(input_ids[0, prompt_len:].tolist()[-64:], skip_special_tokens=True)
            done = bool(stop_text) and stop_text in tail
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    seed = sampling.seed if sampling.seed is not None else default_seed
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=GenerationConfig(**kwargs),
            streamer=stream,
            stopping_criteria=StoppingCriteriaList([StopAtText()]) if stop_text else None,
        )
    return stream.text


def answer(
    target_model: Any,
    tokenizer: Any,
    messages: Sequence[dict],
    chat: bool,
    sampling: Sampling,
    on_text: Callable[[str], None] = lambda text: None,
    default_seed: int = 0,
) -> str:
    """The model's reply to ``messages`` (rendered with the chat template when ``chat``),
    streamed to ``on_text``; stops at the template's turn terminator too."""
    ids = render_messages(tokenizer, messages, chat)
    stop = turn_terminator(tokenizer) if chat else None
    return generate(target_model, tokenizer, ids, sampling, on_text, stop, default_seed)


# --- prompt files --------------------------------------------------------------------------

#: Prompt files larger than this are refused before they are read.
MAX_PROMPTS_BYTES = 16 << 20


def read_prompts(path: Path, option: str = wording.option("prompts")) -> list[list[dict]]:
    """The prompts of a file, each as a list of messages: a ``.jsonl`` file holds one JSON value
    a line (a string, ``{"prompt": TEXT}`` or ``{"messages": [...]}`` in the chat data format);
    any other file one prompt a line (blank lines skipped)."""
    try:
        if not path.is_file():
            raise TargetError(f"{option}: {path} is not a readable file")
        if path.stat().st_size > MAX_PROMPTS_BYTES:
            raise TargetError(f"{option}: {path} is larger than {MAX_PROMPTS_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TargetError(f"{option}: {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise TargetError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None
    prompts: list[list[dict]] = []
    is_jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append([{"role": "user", "content": line}])
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise TargetError(f"{option}: {path} line {number}: not JSON ({short_text(str(exc), 100)})") from None
        prompts.append(_prompt_messages(value, f"{option}: {path} line {number}"))
    if not prompts:
        raise TargetError(f"{option}: {path} holds no prompt")
    return prompts


def _prompt_messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        return [{"role": "user", "content": value["prompt"]}]
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        messages = value["messages"]
        if messages and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # a training row: answer its last user turn
            if messages:
                return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise TargetError(f'{where}: expected a string, {{"prompt": TEXT}} or {{"messages": [{{"role", "content"}}, ...]}}')


# --- saving conversations ------------------------------------------------------------------


def append_conversation(path: Path, messages: Sequence[dict], option: str = "/save") -> None:
    """Append ``{"messages": [...]}`` (the chat data format) as one line to the jsonl file
    ``path``, creating it if needed. The line is written with one ``write`` on a descriptor
    opened ``O_APPEND | O_NOFOLLOW`` and synced, so concurrent appends do not interleave and a
    crash leaves at most a missing line; a symlink, a directory or a non-regular file is
    refused, as is a parent directory that does not exist."""
    import os
    import stat

    path = Path(path)
    try:
        if path.is_symlink():
            raise TargetError(f"{option}: {path} is a symbolic link; refusing to write through it")
        if path.exists() and not path.is_file():
            raise TargetError(f"{option}: {path} is not a regular file")
        if not path.parent.is_dir():
            raise TargetError(f"{option}: the directory {path.parent} does not exist")
    except OSError as exc:
        raise TargetError(f"{option}: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None
    line = json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}, ensure_ascii=False) + "\n"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise TargetError(f"{option}: cannot open {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TargetError(f"{option}: {path} is not a regular file")
        if info.st_size > 0:
            with open(path, "rb") as existing:  # a file that does not end in a newline gets one first
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    line = "\n" + line
        data = line.encode("utf-8")
        written = os.write(fd, data)
        if written != len(data):
            raise TargetError(f"{option}: {path}: short write ({written} of {len(data)} bytes); the disk may be full")
        os.fsync(fd)
    except OSError as exc:
        raise TargetError(f"{option}: cannot write {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
