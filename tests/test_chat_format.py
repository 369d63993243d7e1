"""The ``chat`` data format: conversations (OpenAI and ShareGPT rows, configurable fields and
roles, system prompts), the five builtin template families, exact assistant-only masking (a
property test on random conversations, three tokenizers: bytes, BPE with merges, and BPE without
offsets), bad input named by file and line, and padding that never hides EOS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_user_error, base_config, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_plugins import DataContext
from qlora_plugins.builtin_plugins.chat_templates import MARKERS, TEMPLATES
from qlora_plugins.builtin_plugins.data_chat import ChatEncoder, special_stops
from qlora_plugins.builtin_plugins.model_sources import byte_level_tokenizer, chat_tokenizer
from qlora_plugins.errors import ConfigError, DataError
from qlora_plugins.testing import make_registry

ALL_MARKERS = sorted({m for markers in MARKERS.values() for m in markers})
#: What closes an assistant turn in each family (the byte tokenizers' EOS is </s>).
TERMINATOR = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}
#: What the template writes once after the last message, trained with a conversation's final turn.
FINAL_TAIL = {"phi3": "\n</s>"}
WORDS = "hello world how are you fine thank the quick brown fox jumps over lazy dog 42 7 yes no".split()


def bytes_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ALL_MARKERS})
    return tok


def merges_tokenizer():
    """A byte-level BPE with merges (GPT-2 pre-tokenization, trimmed offsets), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS) + ", " + " ".join(reversed(WORDS)) + "!\n\n user assistant system model"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ALL_MARKERS})
    return fast


class NoOffsets:
    """A tokenizer that gives no offsets (like a slow one): boundaries come from prefixes."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


TOKENIZERS = {"bytes": bytes_tokenizer(), "merges": merges_tokenizer()}
TOKENIZERS["no-offsets"] = NoOffsets(TOKENIZERS["merges"])


def encoder(family: str, tokenizer=None, train_on: str = "assistant", max_length: int = 100_000) -> ChatEncoder:
    tok = tokenizer or TOKENIZERS["bytes"]
    template = TEMPLATES[family]
    stops = tuple(sorted(set(template.stops) | set(special_stops(tok))))
    return ChatEncoder(tok, template.source, f"template '{family}'", stops, train_on, max_length)


def trained_runs(tokenizer, out: dict) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def expected_runs(family: str, messages: list[dict]) -> list[str]:
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            tail = FINAL_TAIL.get(family, "") if i == len(messages) - 1 else ""
            out.append(m["content"] + TERMINATOR[family] + tail)
    return out


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
    "\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>"
    "\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "mistral": "<s>[INST] Be brief.\n\nHi there [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n"
    "<|assistant|>\n4<|end|>\n</s>",
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_each_family_renders_its_format_and_trains_exactly_the_assistant_turns(family):
    tok = TOKENIZERS["bytes"]
    out = encoder(family).encode(CONVERSATION)
    assert tok.decode(out["input_ids"], skip_special_tokens=False) == RENDERED[family]
    assert trained_runs(tok, out) == expected_runs(family, CONVERSATION)
    # the markers are single special tokens, and the terminator is trained as one
    terminator = tok.convert_tokens_to_ids(TERMINATOR[family])
    assert terminator in [label for label in out["labels"] if label != -100]
    assert out["dropped"] is None and out["truncated"] is False


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_last_assistant_and_all(family):
    tok = TOKENIZERS["bytes"]
    last = encoder(family, train_on="last_assistant").encode(CONVERSATION)
    assert trained_runs(tok, last) == expected_runs(family, CONVERSATION)[-1:]
    everything = encoder(family, train_on="all").encode(CONVERSATION)
    assert everything["labels"] == everything["input_ids"]


def _content(draw, plain: bool) -> str:
    if plain:  # any text, including leading/trailing whitespace, markers' characters and non-ASCII
        return draw(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24))
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))
    seps = draw(st.lists(st.sampled_from([" ", "\n", ", ", "  ", "! "]), min_size=len(words), max_size=len(words)))
    return words[0] + "".join(s + w for s, w in zip(seps[1:], words[1:])) + draw(st.sampled_from(["", ".", "!", " ", "\n"]))


@st.composite
def conversations(draw, plain: bool):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": _content(draw, plain)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": _content(draw, plain)})
        messages.append({"role": "assistant", "content": _content(draw, plain)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": _content(draw, plain)})
    return messages


@pytest.mark.parametrize("tokenizer", sorted(TOKENIZERS))
@pytest.mark.parametrize("family", sorted(TEMPLATES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_trained_tokens_are_exactly_the_assistant_contents_and_terminators(family, tokenizer, data):
    tok = TOKENIZERS[tokenizer]
    messages = data.draw(conversations(plain=tokenizer == "bytes"))
    out = encoder(family, tok).encode(messages)
    assert trained_runs(tok, out) == expected_runs(family, messages)
    # every token is accounted for: the whole sequence is the template's rendering
    rendered = tok.apply_chat_template(messages, chat_template=TEMPLATES[family].source, tokenize=False)
    assert tok.decode(out["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False) == rendered


def test_a_token_straddling_the_start_of_a_turn_is_trained():
    """A template that writes `assistant: ` before the content: BPE merges the space into the
    first word, and that token (what the model must produce) is trained."""
    tok = TOKENIZERS["merges"]
    source = (
        "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}"
    )
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    ids = tok("assistant: hello world", add_special_tokens=False)["input_ids"]
    assert " hello" in [tok.decode([i]) for i in ids]  # the premise: the space and the word are one token
    for t in (tok, TOKENIZERS["no-offsets"]):
        out = ChatEncoder(t, source, "test", special_stops(tok)).encode(messages)
        assert trained_runs(tok, out) == [" hello world\n"]


def test_templates_that_trim_contents_or_carry_generation_tags():
    tok = TOKENIZERS["bytes"]
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "  yo \n"}]
    trimming = TEMPLATES["chatml"].source.replace("message['content']", "(message['content'] | trim)")
    out = ChatEncoder(tok, trimming, "test", special_stops(tok)).encode(messages)
    assert trained_runs(tok, out) == ["yo<|im_end|>"]
    tagged = (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['role'] == 'assistant' -%}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{%- else -%}{{ m['content'] + '<|im_end|>' }}{%- endif -%}{{ '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    plain = encoder("chatml").encode(CONVERSATION)
    assert ChatEncoder(tok, tagged, "test", special_stops(tok)).encode(CONVERSATION) == plain


def test_a_template_that_is_not_prefix_stable_is_refused_for_the_row():
    # renders the last message with a marker the earlier turns do not have once more follow
    source = "{%- for m in messages -%}{{ m['role'] + ':' + m['content'] + ('!' if loop.last else '') + '\\n' }}{%- endfor -%}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    enc = ChatEncoder(TOKENIZERS["bytes"], source, "test template", ())
    with pytest.raises(Exception, match="not prefix-stable"):
        enc.encode(messages)


# --- through the format's load ------------------------------------------------------------------


def load(tmp_path: Path, rows, tokenizer=None, name: str = "rows.jsonl", raw: str | None = None, rows_written=False, **options):
    path = tmp_path / name
    if rows_written:
        pass
    elif raw is not None:
        path.write_text(raw, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    options = {"path": name, "eval_fraction": 0.0, "template": "chatml", **options}
    fmt = make_registry().create("data_format", "chat", options, "data")
    return fmt.load(DataContext(tokenizer or TOKENIZERS["bytes"], "causal_lm", 0, tmp_path, "data"))


OPENAI = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}


def only(splits):
    assert len(splits.train) == 1
    return splits.train[0]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet"])
def test_openai_and_sharegpt_rows_give_the_same_example(tmp_path, name):
    a = only(load(tmp_path, [OPENAI], name=name))
    b = only(load(tmp_path, [SHAREGPT], name="share-" + name))
    assert a == b
    assert trained_runs(TOKENIZERS["bytes"], {"input_ids": a["input_ids"], "labels": a["labels"]}) == ["yo<|im_end|>"]


def test_field_and_role_names_are_options(tmp_path):
    row = {"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "yo"}]}
    got = only(
        load(
            tmp_path,
            [row],
            messages_field="dialog",
            role_field="speaker",
            content_field="text",
            roles={"customer": "user", "agent": "assistant"},
        )
    )
    assert got == only(load(tmp_path, [OPENAI], name="b.jsonl"))


def test_system_prompts(tmp_path):
    tok = TOKENIZERS["bytes"]

    def text(splits):
        return tok.decode(only(splits)["input_ids"], skip_special_tokens=False)

    assert text(load(tmp_path, [OPENAI], system_prompt="Be kind.")).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    own = {"messages": [{"role": "system", "content": "Mine."}] + OPENAI["messages"]}
    assert "Be kind." not in text(load(tmp_path, [own], name="b.jsonl", system_prompt="Be kind."))
    row = {**SHAREGPT, "system": "From the row."}
    assert text(load(tmp_path, [row], name="c.jsonl", system_field="system", system_prompt="x")).startswith(
        "<|im_start|>system\nFrom the row.<|im_end|>"
    )


def test_the_tokenizers_own_template_and_a_template_file(tmp_path):
    tok = chat_tokenizer()  # tiny-llama-chat's: ChatML with <|im_start|>/<|im_end|> as special tokens
    own = only(load(tmp_path, [OPENAI], tokenizer=tok, template=None))
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "chat.jinja").write_text(TEMPLATES["chatml"].source, encoding="utf-8")
    from_file = only(load(tmp_path, [OPENAI], tokenizer=tok, name="b.jsonl", template=None, template_file="tpl/chat.jinja"))
    assert own == from_file
    assert trained_runs(tok, {"input_ids": own["input_ids"], "labels": own["labels"]}) == ["yo<|im_end|>"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == own["labels"][-2]


def test_truncation_drops_and_counts(tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "yo"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 200}]}
    splits = load(tmp_path, [OPENAI, long_prompt, long_answer, OPENAI], max_length=64, min_kept_fraction=0.5)
    assert (splits.rows, splits.dropped, splits.truncated, len(splits.train)) == (4, 1, 1, 3)
    assert all(len(e["input_ids"]) <= 64 for e in splits.train)
    with pytest.raises(DataError, match=r"data.max_length: no conversation in b.jsonl keeps a trained token .*first: line 1"):
        load(tmp_path, [long_prompt], name="b.jsonl", max_length=64)
    with pytest.raises(DataError, match=r"only 1 of 3 conversations .*first: line 2"):
        load(tmp_path, [OPENAI, long_prompt, long_prompt], name="c.jsonl", max_length=64)


BAD_ROWS = [
    ('{"messages": "hello"}', "line 3: field 'messages' is not a conversation"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "line 3: message 1: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 3: no assistant message to train on (data.train_on: assistant)"),
    (
        '{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}',
        "line 3: message 1 (user): content must be text",
    ),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "line 3: message 1 (user) has no content"),
    ('{"messages": []}', "line 3: field 'messages' is an empty conversation"),
    ('{"messages": [{"role": "user", "content": "hi"}', "line 3: not valid JSON"),
    ('{"messages": [3]}', "line 3: message 1 is not an object"),
]


@pytest.mark.parametrize("line, message", BAD_ROWS, ids=[m.split(": ", 1)[1][:30] for _, m in BAD_ROWS])
def test_bad_rows_are_named_by_file_and_line(tmp_path, line, message):
    good = json.dumps(OPENAI)
    with pytest.raises(DataError) as info:
        load(tmp_path, None, raw=f"{good}\n\n{line}\n{good}\n")
    assert str(info.value).startswith("data.path: rows.jsonl ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_sharegpt_line_that_breaks_the_table_is_named(tmp_path):
    good = json.dumps(SHAREGPT)
    bad = '{"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}'
    with pytest.raises(DataError, match=r"^data.path: rows.jsonl line 2: message 1 \(user\): content must be text, got 5$"):
        load(tmp_path, None, raw=f"{good}\n{bad}\n")


def test_errors_number_messages_as_the_row_does(tmp_path):
    (tmp_path / "unstable.jinja").write_text(
        "{%- for m in messages -%}{{ m['role'] + ':' + m['content'] + ('!' if loop.last else '') + '\\n' }}{%- endfor -%}", encoding="utf-8"
    )
    row = {"messages": OPENAI["messages"] + [{"role": "user", "content": "more"}]}
    for extra in ({}, {"system_prompt": "Be kind."}):
        with pytest.raises(DataError, match=r"rows.jsonl line 1: template file unstable.jinja renders .*message 2 \(assistant\)"):
            load(tmp_path, [row], template=None, template_file="unstable.jinja", **extra)


def test_a_file_that_is_not_utf8_keeps_its_error(tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(json.dumps(OPENAI).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"rows.jsonl is not UTF-8 text \(byte"):
        load(tmp_path, None, raw=None, name="rows.jsonl", rows_written=True)


def test_a_template_that_cannot_render_the_row(tmp_path):
    twice = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match=r"rows.jsonl line 2: template 'mistral' cannot render this conversation: .*roles must alternate"):
        load(tmp_path, [OPENAI, twice], template="mistral")
    with pytest.raises(DataError, match="rows.json row 2: "):
        load(tmp_path, [OPENAI, twice], name="rows.json", template="mistral")


def test_template_errors_before_any_row(tmp_path):
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor", encoding="utf-8")
    with pytest.raises(DataError, match=r"data.template_file: Jinja syntax error on line 2"):
        load(tmp_path, [OPENAI], template=None, template_file="bad.jinja")
    with pytest.raises(DataError, match="data.template: the model's tokenizer has no chat template"):
        load(tmp_path, [OPENAI], template=None)
    with pytest.raises(DataError, match="template file not found"):
        load(tmp_path, [OPENAI], template=None, template_file="nope.jinja")
    with pytest.raises(ConfigError, match=r"data.template: unknown template 'chatlm' \(did you mean 'chatml'\?\)"):
        load(tmp_path, [OPENAI], template="chatlm")
    with pytest.raises(ConfigError, match="not both"):
        load(tmp_path, [OPENAI], template_file="bad.jinja")
    with pytest.raises(ConfigError, match="data.roles"):
        load(tmp_path, [OPENAI], roles={"bot": "robot"})


def test_validate_and_run_report_bad_rows_on_one_line(tmp_path, write_config):
    (tmp_path / "chat.jsonl").write_text(json.dumps(OPENAI) + "\n" + '{"messages": [{"role": "narrator", "content": "x"}]}\n')
    config = base_config(
        model={"source": "tiny-llama-chat"}, data={"name": "chat", "path": "chat.jsonl", "max_length": 64}, train={"max_steps": 1}
    )
    path = write_config(config)
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    assert_user_error(invoke("run", path, "--output", tmp_path / "run"), "data.path: chat.jsonl line 2: message 1: unknown role 'narrator'")
    assert not (tmp_path / "run").exists()
    missing = write_config({**config, "data": {**config["data"], "template_file": "missing.jinja"}}, "missing.yaml")
    assert_user_error(invoke("validate", missing), "data.template_file: template file not found")


# --- padding never hides EOS --------------------------------------------------------------------


def test_padding_with_the_eos_id_keeps_the_eos_labels():
    from qlora_plugins.core.training import collate

    tok = bytes_tokenizer()
    tok.pad_token = tok.eos_token  # what load_tokenizer does for a tokenizer without a pad token
    eos = tok.eos_token_id
    short = encoder("mistral", tok).encode(CONVERSATION[:3])
    long = encoder("mistral", tok).encode(CONVERSATION)
    assert short["input_ids"][-1] == short["labels"][-1] == eos
    batch = collate([short, long], pad_id=tok.pad_token_id, task="causal_lm")
    n = len(short["input_ids"])
    assert batch["input_ids"].shape[1] > n
    assert batch["labels"][0, n - 1].item() == eos  # the EOS: trained although it equals the pad id
    assert (batch["input_ids"][0, n:] == eos).all() and (batch["labels"][0, n:] == -100).all()  # padding: masked by position
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    trained_eos = (batch["labels"] == eos).sum().item()
    assert trained_eos == 2 + 1  # short: one turn; long: two turns


def test_runs_trained_on_conversations_are_chatted_with_their_template():
    """qlora generate/chat/eval render prompts with the chat template for a run whose data format
    is the chat format (``DataFormat.conversational``), and as plain text for the instruction one."""
    from qlora_plugins.inference import is_conversational
    from qlora_plugins.testing import make_registry

    registry = make_registry()
    assert is_conversational({"data": {"name": "chat", "path": "x.jsonl"}}, registry)
    assert not is_conversational({"data": {"name": "instruction", "path": "x.jsonl"}}, registry)


def test_conversations_are_tokenized_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The chat format tokenizes through the data cache: Arrow-backed splits, a second load of the
    same file with the same tokenizer and options is a hit with the same examples, and editing
    the file rebuilds."""
    monkeypatch.setenv("QLORA_PLUGINS_HOME", str(tmp_path / "home"))

    def conversation(user: str, assistant: str) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    rows = [conversation("hello", "hi there"), conversation("what is two and two", "four")]
    first = load(tmp_path, rows)
    again = load(tmp_path, rows, rows_written=True)  # the same file, untouched
    assert not first.train.tokenized.hit and again.train.tokenized.hit
    assert list(again.train) == list(first.train) and len(first.train) == 2
    edited = load(tmp_path, rows + [conversation("and three", "five")])
    assert not edited.train.tokenized.hit and len(edited.train) == 3
