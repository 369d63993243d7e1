"""`qlora generate` (issue 14): a run, an export or a model directory; tokens streamed; the chat
template for chat-trained runs; stops at EOS or the turn terminator; --compare-base; bad input is
one line with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_plugins.inference import (
    Sampling,
    generate,
    is_conversational,
    load_target,
    read_prompts,
    render_messages,
    turn_terminator,
    use_chat_template,
)
from qlora_plugins.testing import make_registry, run_cli

PROMPT = "Hello"  # (the trained tiny run answers "the quick brown fox" with EOS at once)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf_greedy(model_dir: Path, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_output_equals_transformers_generate_on_the_merged_export(trained_run):
    result = run_cli("generate", trained_run["merged"], "--prompt", PROMPT, "--max-new-tokens", 12)
    assert result.exit_code == 0, result.output
    expected = _hf_greedy(trained_run["merged"], PROMPT, 12)
    assert result.stdout == expected + "\n"


@pytest.fixture(scope="module")
def run_target(trained_run):
    return load_target(trained_run["dir"], make_registry())


def test_a_run_generates_streamed_with_the_adapter_as_trained(run_target, trained_run):
    assert run_target.kind == "run" and run_target.adapter_attached and run_target.seed == 0
    pieces: list[str] = []
    ids = render_messages(run_target.tokenizer, [{"role": "user", "content": PROMPT}], chat=False)
    text = generate(run_target.model, run_target.tokenizer, ids, Sampling(max_new_tokens=10), pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text  # streamed piece by piece
    import torch

    with torch.no_grad():  # the same as transformers' own generate on the loaded run
        out = run_target.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    assert text == run_target.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    result = run_cli("generate", trained_run["dir"], "--prompt", PROMPT, "--max-new-tokens", 10, "--compare-base")
    assert result.exit_code == 0, result.output
    base_part, _, tuned_part = result.stdout.partition("--- fine-tuned ---\n")
    assert base_part.startswith("--- base ---\n") and tuned_part == text + "\n"
    with run_target.base_model() as base:  # the base: the same model with the adapter disabled
        base_text = generate(base, run_target.tokenizer, ids, Sampling(max_new_tokens=10))
    assert base_part == f"--- base ---\n{base_text}\n"


def test_stops_at_eos_and_at_the_turn_terminator_without_showing_it(run_target):
    tok = run_target.tokenizer
    eos_first = render_messages(tok, [{"role": "user", "content": "the quick brown fox"}], chat=False)
    assert generate(run_target.model, tok, eos_first, Sampling(max_new_tokens=12)) == ""  # EOS comes first
    ids = render_messages(tok, [{"role": "user", "content": "Write a poem"}], chat=False)
    with run_target.base_model() as model:  # (the base model's answer varies more)
        full = generate(model, tok, ids, Sampling(max_new_tokens=12))
        assert len(set(full)) >= 3
        stop = full[3:6]
        pieces: list[str] = []
        cut = generate(model, tok, ids, Sampling(max_new_tokens=12), pieces.append, stop_text=stop)
    assert cut == full[: full.find(stop)] and "".join(pieces) == cut


def test_sampling_is_seeded(run_target):
    tok, model = run_target.tokenizer, run_target.model
    ids = render_messages(tok, [{"role": "user", "content": PROMPT}], chat=False)
    a = generate(model, tok, ids, Sampling(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, seed=7))
    b = generate(model, tok, ids, Sampling(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, seed=7))
    assert a == b


def test_chat_template_is_rendered_with_the_tokenizers_own_method(run_target):
    tok = run_target.tokenizer
    tok.chat_template = CHATML
    try:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n")
        assert render_messages(tok, messages, chat=True) == tok(text, add_special_tokens=False)["input_ids"]
        assert turn_terminator(tok) == "<|im_end|>"
        assert use_chat_template(run_target, "chat") is True
        assert use_chat_template(run_target, "auto") is False  # the run trained on instruction data
        assert use_chat_template(run_target, "plain") is False
        run_target.chat = True  # a chat-trained run with a template: auto applies it
        assert use_chat_template(run_target, "auto") is True
    finally:
        tok.chat_template = None
        run_target.chat = False
    assert turn_terminator(tok) is None
    from qlora_plugins.errors import TargetError

    with pytest.raises(TargetError, match="no chat template"):
        use_chat_template(run_target, "chat")


def test_a_run_trained_on_conversations_is_recognised():
    from qlora_plugins import DataFormat, hookimpl

    class Conversations(DataFormat):
        """A data format that declares it trains on conversations."""

        name = "conversations_test"
        conversational = True

    class Plugin:
        @staticmethod
        @hookimpl
        def register_data_formats(register):
            register(Conversations)

    registry = make_registry([Plugin])
    assert is_conversational({"data": {"name": "conversations_test"}}, registry)
    assert is_conversational({"data": {"name": "chat"}}, registry, ("chat",))
    assert not is_conversational({"data": {"name": "instruction"}}, registry, ("chat",))
    assert not is_conversational({"model": {}}, registry)


def test_chat_template_through_the_cli_on_a_model_directory(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = CHATML
    tok.save_pretrained(str(model_dir))
    result = run_cli("generate", model_dir, "--prompt", "hi", "--template", "chat", "--system", "be brief", "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    target = load_target(model_dir, make_registry())
    assert target.kind == "model" and not target.has_base
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = render_messages(target.tokenizer, messages, chat=True)
    expected = generate(target.model, target.tokenizer, ids, Sampling(max_new_tokens=6), stop_text="<|im_end|>")
    assert result.stdout == expected + "\n"


def test_prompts_file_text_and_jsonl(tmp_path, trained_run):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    assert [m[0]["content"] for m in read_prompts(text_file)] == ["first prompt", "second prompt"]
    jsonl = tmp_path / "prompts.jsonl"
    rows = [
        '"plain"',
        '{"prompt": "p"}',
        json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
    ]
    jsonl.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert read_prompts(jsonl) == [
        [{"role": "user", "content": "plain"}],
        [{"role": "user", "content": "p"}],
        [{"role": "user", "content": "u"}],
    ]
    result = run_cli("generate", trained_run["merged"], "--prompts", text_file, "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("### ") == 2 and "### first prompt\n" in result.stdout


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_help(command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "TARGET" in result.stdout


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line(tmp_path, trained_run, tiny_llama_dir, tiny_bert_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    merged = trained_run["merged"]
    _one_line_error(run_cli("generate", tmp_path / "missing", "--prompt", "x"), "does not exist")
    _one_line_error(run_cli("generate", tmp_path / "empty", "--prompt", "x"), "is not a run directory")
    _one_line_error(run_cli("generate", tmp_path / "file", "--prompt", "x"), "not a directory")
    _one_line_error(run_cli("generate", merged), "--prompt")
    _one_line_error(run_cli("generate", merged, "--prompt", "x", "--temperature", "-1"), "--temperature")
    _one_line_error(run_cli("generate", merged, "--prompt", "x", "--top-p", "0"), "--top-p")
    _one_line_error(run_cli("generate", merged, "--prompt", "x", "--top-p", "1.5"), "--top-p")
    _one_line_error(run_cli("generate", merged, "--prompt", "x", "--top-k", "-1"), "--top-k")
    _one_line_error(run_cli("generate", merged, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens")
    _one_line_error(run_cli("generate", merged, "--prompts", tmp_path / "nope.txt"), "--prompts")
    _one_line_error(run_cli("generate", merged, "--prompts", tmp_path / "empty"), "--prompts")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    _one_line_error(run_cli("generate", merged, "--prompts", tmp_path / "latin1.txt"), "not UTF-8")
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    _one_line_error(run_cli("generate", merged, "--prompts", tmp_path / "bad.jsonl"), "line 1")
    _one_line_error(run_cli("generate", tiny_llama_dir, "--prompt", "x", "--compare-base"), "--compare-base")
    _one_line_error(run_cli("generate", tiny_bert_dir, "--prompt", "x"), "needs a causal_lm model")
    _one_line_error(run_cli("chat", tmp_path / "empty"), "is not a run directory")
    _one_line_error(run_cli("chat", merged, "--temperature", "-2"), "--temperature")
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {source: tiny-llama}\n")
    _one_line_error(run_cli("generate", run_dir, "--prompt", "x"), "without a trained adapter")
