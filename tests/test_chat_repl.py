"""`qlora chat` (issue 14): a multi-turn REPL on piped stdin with history, /reset, /system,
/save (the chat data format, appended; symlinks and directories refused) and /exit."""

from __future__ import annotations

import json

import pytest

from qlora_plugins.inference import Sampling, answer, append_conversation, load_target
from qlora_plugins.testing import make_registry


def chat(target, text: str, *args):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    registry = make_registry()
    registry.add_commands(cli)
    return CliRunner().invoke(cli, ["chat", str(target), "--max-new-tokens", "4", *map(str, args)], input=text, obj={"registry": registry})


@pytest.fixture(scope="module")
def target(trained_run):
    return load_target(trained_run["merged"], make_registry())


def test_turns_history_system_save_reset_exit(tmp_path, trained_run, target):
    saved, second = tmp_path / "chats.jsonl", tmp_path / "second.jsonl"
    script = f"Hello\n/system be brief\nWrite a poem\n/save {saved}\n/reset\n/save {second}\n/bogus\nHi\n/exit\nnever read\n"
    result = chat(trained_run["merged"], script)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1
    messages = rows[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "be brief" and messages[1]["content"] == "Hello" and messages[3]["content"] == "Write a poem"
    # each answer is the model's reply to the whole conversation so far (history kept)
    sampling = Sampling(max_new_tokens=4)
    first = answer(target.model, target.tokenizer, messages[1:2], False, sampling, default_seed=1)
    assert messages[2]["content"] == first.strip()
    replay = answer(target.model, target.tokenizer, [messages[0], *messages[1:3], messages[3]], False, sampling, default_seed=2)
    assert messages[4]["content"] == replay.strip()
    assert not second.exists()  # /reset emptied the conversation: nothing to save
    assert "nothing to save" in result.stderr and "unknown command /bogus" in result.stderr
    assert result.stdout.count("\n") == 3  # three answers, "never read" was after /exit


def test_save_appends_and_refuses_links_and_directories(tmp_path, trained_run):
    existing = tmp_path / "existing.jsonl"
    existing.write_text('{"messages": []}', encoding="utf-8")  # no final newline
    target_file = tmp_path / "real.jsonl"
    target_file.write_text("", encoding="utf-8")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target_file)
    (tmp_path / "dir.jsonl").mkdir()
    script = f"Hello\n/save {existing}\n/save {link}\n/save {tmp_path / 'dir.jsonl'}\n/save {tmp_path / 'no' / 'such.jsonl'}\n/save\n"
    result = chat(trained_run["merged"], script)
    assert result.exit_code == 0, result.output
    lines = existing.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["messages"][0] == {"role": "user", "content": "Hello"}
    assert target_file.read_text() == ""
    assert "symbolic link" in result.stderr and "not a regular file" in result.stderr
    assert "does not exist" in result.stderr and "name a file" in result.stderr


def test_append_conversation_is_one_line_per_call(tmp_path):
    path = tmp_path / "c.jsonl"
    for i in range(3):
        append_conversation(path, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a\nb"}])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == ["q0", "q1", "q2"] and rows[0]["messages"][1]["content"] == "a\nb"


def test_end_of_input_ends_the_chat(trained_run):
    result = chat(trained_run["merged"], "Hello\n")
    assert result.exit_code == 0 and result.stdout.count("\n") == 1


def test_chat_template_turns_on_a_model_directory(tmp_path, tiny_llama_dir):
    import shutil

    from transformers import AutoTokenizer

    from qlora_plugins.inference import render_messages, turn_terminator

    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = chatml
    tok.save_pretrained(str(model_dir))
    saved = tmp_path / "chat.jsonl"
    result = chat(model_dir, f"hi\nand then\n/save {saved}\n", "--template", "chat", "--system", "be brief")
    assert result.exit_code == 0, result.output
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    target = load_target(model_dir, make_registry())
    assert turn_terminator(target.tokenizer) == "<|im_end|>"
    second = render_messages(target.tokenizer, messages[:4], chat=True)  # the history, through the template
    text = target.tokenizer.decode(second)
    assert text.count("<|im_start|>") == 5 and text.endswith("<|im_start|>assistant\n")
    reply = answer(target.model, target.tokenizer, messages[:4], True, Sampling(max_new_tokens=4), default_seed=2)
    assert messages[4]["content"] == reply.strip() and "<|im_end|>" not in reply
