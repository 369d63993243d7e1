"""Builtin commands ``qlora generate`` and ``qlora chat``: try a fine-tuned model (a run, an
export or a model directory), tokens streamed to stdout as they are generated."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from qlora_plugins import hookimpl


def sampling_options(fn: Callable) -> Callable:
    """The sampling flags shared by ``generate`` and ``chat``."""
    for option in reversed(
        [
            click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Generate at most this many tokens."),
            click.option("--temperature", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 is greedy decoding."),
            click.option(
                "--top-p",
                type=float,
                default=1.0,
                show_default=True,
                help="Nucleus sampling: keep tokens up to this probability mass (1: off).",
            ),
            click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens (0: off)."),
            click.option("--seed", type=int, default=None, help="Seed of the sampler (default: the run's train.seed, or 0)."),
            click.option(
                "--template",
                type=click.Choice(["auto", "chat", "plain"]),
                default="auto",
                show_default=True,
                help="auto: the tokenizer's chat template when the run trained on conversations (chat data) and the "
                "tokenizer has one; chat: always; plain: the prompt text as is.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _registry(ctx: click.Context) -> Any:
    registry = (ctx.find_object(dict) or {}).get("registry")
    if registry is None:
        from qlora_plugins.api import create_registry

        registry = create_registry()
    return registry


def _quiet() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _log(message: str) -> None:
    click.echo(message, err=True)


def _check_target(target: Path) -> str:
    from qlora_plugins.inference import kind_of

    return kind_of(target)


def load_for_generation(ctx: click.Context, target: Path, compare_base: bool = False) -> Any:
    """Check TARGET's kind (cheap), then load it; ``--compare-base`` needs a run or an export."""
    from qlora_plugins.errors import TargetError
    from qlora_plugins.inference import load_target

    kind = _check_target(target)
    if kind == "model":
        from qlora_plugins.inference import model_task

        if model_task(target) != "causal_lm":  # before loading anything
            raise TargetError(f"TARGET: {target} is a {model_task(target)} model; generation needs a causal_lm model")
    if compare_base and kind == "model":
        raise TargetError(f"--compare-base: {target} is a model directory; give a run directory or an export to compare with its base")
    _quiet()
    loaded = load_target(target, _registry(ctx), _log)
    if loaded.task != "causal_lm":
        raise TargetError(f"TARGET: {target} is a {loaded.task} model; generation needs a causal_lm model")
    if compare_base and not loaded.has_base:
        raise TargetError(f"--compare-base: the manifest of {target} records no run, so its base model is unknown")
    return loaded


def _echo(text: str) -> None:
    click.echo(text, nl=False)


@click.command("generate")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help='Prompts from FILE: one a line, or .jsonl with a string, {"prompt": TEXT} or {"messages": [...]} a line.',
)
@click.option("--system", metavar="TEXT", help="A system message before each prompt (with the chat template).")
@sampling_options
@click.option("--compare-base", is_flag=True, help="Also answer with the base model (the adapter disabled) and show both, base first.")
@click.pass_context
def generate_command(
    ctx: click.Context,
    target: Path,
    prompts: tuple[str, ...],
    prompts_file: Path | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    template: str,
    compare_base: bool,
) -> None:
    """Generate text with TARGET: a run directory (the 4-bit base with the trained adapter, as
    trained), an export directory (adapter, merged, merged_4bit: read from its manifest.json)
    or a model directory.

    Tokens are printed as they are generated; generation stops at the end-of-sequence token,
    at the chat template's turn terminator or after --max-new-tokens. With several prompts,
    each answer follows a `### PROMPT` line. --temperature 0 (the default) is greedy decoding.
    """
    from qlora_plugins.errors import ConfigError
    from qlora_plugins.inference import answer, read_prompts, sampling_from_flags, use_chat_template

    sampling = sampling_from_flags(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if prompts_file is not None:
        conversations += read_prompts(prompts_file, "--prompts")
    if not conversations:
        raise ConfigError("--prompt", "give a prompt (--prompt TEXT) or a file of prompts (--prompts FILE)")
    loaded = load_for_generation(ctx, target, compare_base)
    chat = use_chat_template(loaded, template)
    if system:
        conversations = [[{"role": "system", "content": system}, *c] if c[0]["role"] != "system" else c for c in conversations]
    several = len(conversations) > 1
    for messages in conversations:
        if several:
            click.echo(f"### {messages[-1]['content']}")
        if compare_base:
            click.echo("--- base ---")
            with loaded.base_model() as base:
                answer(base, loaded.tokenizer, messages, chat, sampling, _echo, loaded.seed)
            click.echo("")
            click.echo("--- fine-tuned ---")
        answer(loaded.model, loaded.tokenizer, messages, chat, sampling, _echo, loaded.seed)
        click.echo("")


CHAT_HELP = """Commands: /reset (forget the conversation), /system TEXT (set the system message; /system alone removes it),
/save FILE (append the conversation to FILE as a chat-format jsonl line), /exit (or end of input)."""


@click.command("chat")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--system", metavar="TEXT", help="The system message to start with.")
@sampling_options
@click.pass_context
def chat_command(
    ctx: click.Context,
    target: Path,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    template: str,
) -> None:
    """Chat with TARGET (a run, an export or a model directory), turn by turn, with history.

    Each line read from stdin is a user turn; the answer is streamed to stdout. Works with
    piped input (`printf 'hi\\n/save chats.jsonl\\n' | qlora chat RUN`).

    \b
    /reset         forget the conversation (the system message stays)
    /system TEXT   set the system message (/system alone removes it)
    /save FILE     append the conversation to FILE ({"messages": [...]} jsonl, the chat data format)
    /exit          leave (so does end of input)
    """
    from qlora_plugins.errors import QloraError
    from qlora_plugins.inference import answer, append_conversation, sampling_from_flags, use_chat_template

    sampling = sampling_from_flags(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    loaded = load_for_generation(ctx, target)
    chat = use_chat_template(loaded, template)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    system_message = system
    if interactive:
        _log(f"Chatting with {target} ({'chat template' if chat else 'plain text'}). {CHAT_HELP}")
    turn = 0
    while True:
        if interactive:
            click.echo("you> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history.clear()
            _log("(conversation reset)")
            continue
        if command == "/system":
            system_message = rest.strip() or None
            _log("(system message set)" if system_message else "(system message removed)")
            continue
        if command == "/save":
            if not rest.strip():
                _log("Error: /save: name a file (/save FILE)")
                continue
            if not history:
                _log("Error: /save: nothing to save yet")
                continue
            messages = ([{"role": "system", "content": system_message}] if system_message else []) + history
            try:
                append_conversation(Path(rest.strip()), messages)
            except QloraError as exc:
                _log(f"Error: {exc}")
                continue
            _log(f"(saved {len(history) // 2} turn(s) to {rest.strip()})")
            continue
        if command == "/help":
            _log(CHAT_HELP)
            continue
        if command.startswith("/") and len(command) > 1 and not command[1:2].isspace():
            _log(f"Error: unknown command {command}. {CHAT_HELP}")
            continue
        messages = ([{"role": "system", "content": system_message}] if system_message else []) + history
        messages.append({"role": "user", "content": text})
        turn += 1
        try:
            reply = answer(loaded.model, loaded.tokenizer, messages, chat, sampling, _echo, loaded.seed + turn)
        except KeyboardInterrupt as exc:  # Ctrl-C stops this answer (the turn is dropped); SIGTERM ends the chat
            click.echo("")
            if type(exc).__name__ == "Terminated" or not interactive:
                raise
            _log("(answer interrupted; the turn is not kept)")
            continue
        click.echo("")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]


@hookimpl
def register_commands(cli):
    cli.add_command(generate_command)
    cli.add_command(chat_command)
