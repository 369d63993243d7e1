"""``qlora data preview``: the examples as the model sees them, trained tokens marked, and the
statistics of the whole set, for every data format; and ``examples/chat.yaml`` end to end."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CLASSIFY, CORPUS, INSTRUCTIONS, REPO, assert_user_error, base_config

from qlora_plugins.testing import make_registry, run_cli

CHAT_YAML = REPO / "examples" / "chat.yaml"
CHAT_DATA = REPO / "examples" / "data" / "chat.jsonl"


def preview(*args):
    return run_cli("data", "preview", *args, registry=make_registry())


def assistant_turns() -> list[list[str]]:
    rows = [json.loads(line) for line in CHAT_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[m["content"] for m in row["messages"] if m["role"] == "assistant"] for row in rows]


def runs(tokens: list[str], mask: list[int]) -> list[str]:
    out, current = [], ""
    for token, trained in zip(tokens, mask):
        if trained:
            current += token
        elif current:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def test_the_shipped_chat_data_is_what_make_chat_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_chat", REPO / "examples" / "data" / "make_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.text() == CHAT_DATA.read_text(encoding="utf-8")
    turns = assistant_turns()
    assert len(turns) == 320 and any(len(t) >= 2 for t in turns)


def test_preview_of_the_chat_example_marks_only_assistant_turns():
    result = preview(CHAT_YAML, "--n", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "in [[...]]" in out and "\x1b[" not in out
    turns = assistant_turns()
    for contents in turns[:2]:  # the training split keeps the file's order
        for content in contents:
            assert f"[[{content}<|im_end|>]]" in out
    assert out.count("[[") - 1 == sum(len(c) for c in turns[:2])  # and the header line's "[[...]]"
    assert "<|im_start|>user\n" in out and "[[<|im_start|>" not in out
    for label in ("rows read", "examples kept", "dropped", "truncated", "tokens", "trained tokens", "Length histogram"):
        assert label in out


def test_preview_json_gives_ids_tokens_and_the_trained_mask():
    result = preview(CHAT_YAML, "--n", "3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "chat" and len(doc["examples"]) == 3
    turns = assistant_turns()
    for example, contents in zip(doc["examples"], turns):
        assert len(example["input_ids"]) == len(example["tokens"]) == len(example["trained"]) == example["length"]
        assert set(example["trained"]) == {0, 1}
        assert runs(example["tokens"], example["trained"]) == [c + "<|im_end|>" for c in contents]
        assert "".join(example["tokens"]) == example["text"]
    stats = doc["statistics"]
    assert stats["rows"] == len(turns) == stats["examples"] == stats["train_examples"] + stats["eval_examples"]
    assert stats["dropped"] == 0 and stats["truncated"] == 0
    assert 0 < stats["trained_tokens"] < stats["tokens"] and stats["trained_share"] == pytest.approx(
        stats["trained_tokens"] / stats["tokens"]
    )
    assert sum(b["count"] for b in stats["histogram"]) == stats["examples"]
    assert stats["histogram"][-1]["to"] >= stats["length"]["max"]


def test_preview_counts_truncated_and_dropped_and_colours_on_request():
    result = preview(CHAT_YAML, "--set", "data.max_length=120", "--set", "data.min_kept_fraction=0", "--json", "--n", "0")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["statistics"]
    assert stats["truncated"] > 0 and stats["dropped"] >= 0 and stats["length"]["max"] <= 120
    assert stats["examples"] + stats["dropped"] == stats["rows"]
    coloured = preview(CHAT_YAML, "--n", "1", "--color")
    assert coloured.exit_code == 0 and "\x1b[" in coloured.stdout and "[[" not in coloured.stdout


@pytest.mark.parametrize(
    "data, model, check",
    [
        ({"name": "instruction", "path": str(INSTRUCTIONS), "max_length": 64}, "tiny-llama", "trained"),
        ({"name": "text", "path": str(CORPUS), "max_length": 32}, "tiny-llama", "all"),
        ({"name": "classification", "path": str(CLASSIFY), "max_length": 32}, "tiny-bert", "label"),
    ],
    ids=["instruction", "text", "classification"],
)
def test_preview_works_for_every_format(write_config, data, model, check):
    config = base_config(model={"source": model, "task": "seq_cls" if model == "tiny-bert" else "causal_lm"}, data=data)
    if model == "tiny-bert":
        config["export"] = []
    path = write_config(config)
    result = preview(path, "--json", "--n", "2")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    first = doc["examples"][0]
    if check == "label":
        assert "label" in first and doc["statistics"]["trained_tokens"] is None
    elif check == "all":
        assert all(first["trained"]) and doc["statistics"]["trained_share"] == 1.0
    else:
        assert 0 < sum(first["trained"]) < first["length"] and first["trained"][-1] == 1  # the response and its EOS
    text = preview(path, "--n", "1")
    assert text.exit_code == 0 and "Statistics" in text.stdout


def test_preview_errors_are_one_line(tmp_path, write_config):
    no_data = write_config(base_config(data=None, train={"enabled": False}))
    assert_user_error(preview(no_data), "data: the config has no data section")
    shutil.copy(CHAT_DATA, tmp_path / "chat.jsonl")
    with open(tmp_path / "chat.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n')
    bad = write_config(base_config(model={"source": "tiny-llama-chat"}, data={"name": "chat", "path": "chat.jsonl"}), "bad.yaml")
    assert_user_error(preview(bad), f"data.path: chat.jsonl line {len(assistant_turns()) + 1}: message 2: unknown role 'robot'")
    assert_user_error(preview(tmp_path / "nope.yaml"))


def test_a_run_refuses_a_dataset_without_a_trained_token(tmp_path, write_config):
    rows = [{"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]}] * 4
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = write_config(base_config(model={"source": "tiny-llama-chat"}, data={"name": "chat", "path": "c.jsonl", "max_length": 16}))
    error = assert_user_error(run_cli("run", path, "--output", tmp_path / "run", registry=make_registry()))
    assert "no conversation in c.jsonl keeps a trained token within max_length=16 (first: line 1)" in error
    assert not (tmp_path / "run").exists()


def test_data_group_help_lists_preview():
    result = run_cli("data", "--help", registry=make_registry())
    assert result.exit_code == 0 and "preview" in result.stdout


@pytest.mark.slow
def test_the_chat_example_trains_offline(tmp_path):
    result = run_cli(
        "run", CHAT_YAML, "--output", tmp_path / "run", "--set", "train.max_steps=2",
        "--set", "train.batch_size=2", "--set", "data.max_examples=24", "--no-progress", "--json", registry=make_registry(),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plugins"]["data"]["name"] == "chat"
    assert (tmp_path / "run" / "exports" / "adapter").is_dir()
