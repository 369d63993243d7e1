"""The tokenization cache (docs/data-cache.md): builtin formats tokenize into memory-mapped Arrow
through ``qlora_plugins.data.tokenize_cached``; a second run and a ``--resume`` reuse the entry;
a changed file, tokenizer or option rebuilds it; a damaged entry is rebuilt; the file is streamed
for validation, with errors naming the byte and line."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import assert_user_error, base_config, invoke, new_registry

import qlora_plugins.core.data_cache as data_cache
from qlora_plugins import DataContext
from qlora_plugins.data import Encoder, Examples, data_cache_dir, scan_file, tokenize_cached
from qlora_plugins.errors import DataError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> Path:
    """A fresh cache home (the tiny model stays where the session made it)."""
    path = tmp_path / "home"
    monkeypatch.setenv("QLORA_PLUGINS_HOME", str(path))
    monkeypatch.setattr(data_cache, "_DIGESTS", {})
    return path


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list:
    """Counts the cache misses (entries built)."""
    calls: list = []
    real = data_cache._build

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(data_cache, "_build", counting)
    return calls


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def rows_file(path: Path, n: int = 24, long_prompts: int = 0) -> Path:
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"word {i}"} for i in range(n)]
    rows += [{"instruction": "x" * 400, "output": "y"} for _ in range(long_prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tokenizer, data: Path, seed: int = 0, **options):
    fmt = new_registry().create("data_format", "instruction", {"path": str(data), "max_length": 64, **options}, "data")
    return fmt.load(DataContext(tokenizer, "causal_lm", seed, data.parent, "data"))


def entries() -> list[Path]:
    return sorted(p for p in data_cache_dir().glob("instruction-*") if p.is_dir())


def test_splits_are_arrow_backed_and_a_second_load_hits(home, builds, tokenizer, tmp_path):
    data = rows_file(tmp_path / "rows.jsonl", long_prompts=3)
    first = load(tokenizer, data)
    assert isinstance(first.train, Examples) and first.train.tokenized.dataset.cache_files  # memory-mapped files
    assert (first.rows, first.dropped, len(first.train) + len(first.eval)) == (27, 3, 24)
    assert isinstance(first.train[0]["input_ids"], list) and isinstance(first.eval[:2], list)
    assert first.train[-1] == first.train[len(first.train) - 1] and first.eval[5:5] == []
    with pytest.raises(IndexError):
        first.train[len(first.train)]
    second = load(tokenizer, data)
    assert len(builds) == 1 and second.train.tokenized.hit and len(entries()) == 1
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    assert (second.rows, second.dropped) == (27, 3)  # dropped rows are still counted on a hit
    # the split is a deterministic function of the seed, and eval_fraction does not change the key
    other = load(tokenizer, data, seed=1, eval_fraction=0.25)
    assert len(builds) == 1 and len(other.eval) == 6 and list(other.train) != list(first.train)
    assert list(load(tokenizer, data, seed=1, eval_fraction=0.25).eval) == list(other.eval)


def test_the_split_and_examples_equal_a_list_built_in_order(home, tokenizer, tmp_path):
    from qlora_plugins.data import split_indices

    data = rows_file(tmp_path / "rows.jsonl", n=30, long_prompts=2)
    splits = load(tokenizer, data, seed=7)
    kept = [dict(row) for row in load(tokenizer, data, seed=7).train.tokenized.dataset if row["status"] == 0]
    train_idx, eval_idx = split_indices(len(kept), 0.1, 7)
    assert list(splits.train) == [{"input_ids": kept[i]["input_ids"], "labels": kept[i]["labels"]} for i in train_idx]
    assert list(splits.eval) == [{"input_ids": kept[i]["input_ids"], "labels": kept[i]["labels"]} for i in eval_idx]


def test_file_tokenizer_and_options_changes_rebuild(home, builds, tokenizer, tmp_path):
    import copy
    import os

    data = rows_file(tmp_path / "rows.jsonl")
    load(tokenizer, data)
    load(tokenizer, data, max_length=96)  # an option that changes the tokens
    assert len(builds) == 2
    rows_file(data, n=25)  # the content
    assert len(load(tokenizer, data).train) + len(load(tokenizer, data).eval) == 25 and len(builds) == 3
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))  # the mtime only
    load(tokenizer, data)
    assert len(builds) == 4
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages }}"  # the tokenizer's fingerprint includes its chat template
    load(other, data)
    assert len(builds) == 5
    load(tokenizer, data)
    assert len(builds) == 5 and len(entries()) == 5


@pytest.mark.parametrize("damage", ["truncate-arrow", "garbage-meta", "remove-meta", "remove-arrow"])
def test_a_damaged_entry_is_rebuilt(home, builds, tokenizer, tmp_path, damage):
    data = rows_file(tmp_path / "rows.jsonl")
    expected = list(load(tokenizer, data).train)
    (entry,) = entries()
    arrow, meta = entry / "part-00000.arrow", entry / "meta.json"
    if damage == "truncate-arrow":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "garbage-meta":
        meta.write_text("{not json", encoding="utf-8")
    elif damage == "remove-meta":
        meta.unlink()
    else:
        arrow.unlink()
    again = load(tokenizer, data)
    assert len(builds) == 2 and not again.train.tokenized.hit and list(again.train) == expected
    assert [p.name for p in entries()] == [entry.name] and not [p for p in entry.parent.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_builds_of_one_entry_both_succeed(home, tokenizer, tmp_path):
    data = rows_file(tmp_path / "rows.jsonl")
    results: list = []
    errors: list = []

    def run() -> None:
        try:
            results.append(list(load(tokenizer, data).train))
        except BaseException as exc:  # pragma: no cover - the failure is the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(entries()) == 1 and not [p for p in data_cache_dir().iterdir() if p.name.endswith(".tmp")]


def test_parallel_tokenizing_gives_the_same_examples(home, tokenizer, tmp_path):
    data = rows_file(tmp_path / "rows.jsonl", n=2500, long_prompts=5)
    environ = os.environ
    serial = load(tokenizer, data, num_proc=1, cache=False)
    parallel = load(tokenizer, data, num_proc=2, cache=False)
    assert parallel.train.tokenized.path is None and len(parallel.train.tokenized.dataset.cache_files) == 2
    assert list(parallel.train) == list(serial.train) and parallel.dropped == serial.dropped == 5
    assert not entries()  # data.cache: false writes nothing into the cache
    assert os.environ is environ and os.environ["QLORA_PLUGINS_HOME"] == str(home)  # datasets' workers leave it as it was


def test_a_row_error_in_a_worker_names_the_row(home, tokenizer, tmp_path):
    data = rows_file(tmp_path / "rows.jsonl", n=2500)
    with data.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"instruction": "x", "output": ["a", "list"]}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl row 2501 column 'output': expected text, got a list"):
        load(tokenizer, data, num_proc=2)
    assert not entries() and not list(data_cache_dir().glob(".*.tmp"))


def test_streamed_utf8_check_names_byte_and_line_past_the_first_chunk(home, tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    line = (json.dumps({"instruction": "a" * 100, "output": "b"}) + "\n").encode()
    good = line * (data_cache.CHUNK // len(line) + 10)  # the bad byte lies in the second chunk
    path.write_bytes(good + b'{"instruction": "caf\xe9", "output": "x"}\n')
    for method in ("read_bytes", "read_text"):
        real = getattr(Path, method)

        def guarded(self, *args, _real=real, **kwargs):
            assert self != path, "the data file was read whole"
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Path, method, guarded)
    with pytest.raises(DataError) as info:
        scan_file(path, "data.path")
    offset, line_number = len(good) + len('{"instruction": "caf'), good.count(b"\n") + 1
    assert f"big.jsonl is not UTF-8 text (byte {offset}, line {line_number})" in str(info.value)
    # a multi-byte character cut by the chunk boundary is fine
    cut = b"x" * (data_cache.CHUNK - 1) + "\u00e9\n".encode()
    path.write_bytes(cut)
    assert len(scan_file(path)) == 40


def test_json_lines_parse_errors_name_the_line(home, write_config, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n{"instruction": "e", "outp\n')
    config = write_config(base_config(data={"name": "instruction", "path": str(data)}))
    assert_user_error(invoke("run", config, "-o", tmp_path / "out", "--no-progress"), "data.path: cannot parse ", "broken.jsonl: line 4: ")
    assert not (tmp_path / "out").exists()


def test_a_custom_encoder_through_the_public_api(home, tokenizer, tmp_path):
    """What a third-party format does: its own encoder, facts kept with the entry, a regroup."""
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps({"w": f"w{i}"}) + "\n" for i in range(10)), encoding="utf-8")

    def prepare(rows):
        facts = {"columns": rows.column_names}

        def pairs(batch):
            ids = batch["ids"]
            return {"input_ids": [ids[i] + ids[i + 1] for i in range(0, len(ids) - 1, 2)]}

        return Encoder(lambda batch, idx: {"ids": [tokenizer(w)["input_ids"] for w in batch["w"]]}, meta=facts, regroup=pairs)

    built = tokenize_cached([data], prepare, tokenizer=tokenizer, name="words", options={"n": 1})
    hit = tokenize_cached([data], prepare, tokenizer=tokenizer, name="words", options={"n": 1})
    assert not built.hit and hit.hit and hit.meta == {"columns": ["w"]} and len(hit.dataset) == 5
    assert hit.dataset[0]["input_ids"] == tokenizer("w0")["input_ids"] + tokenizer("w1")["input_ids"]


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, tokenizer):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache home should be")
    monkeypatch.setenv("QLORA_PLUGINS_HOME", str(blocker))
    data = rows_file(tmp_path / "rows.jsonl")
    from qlora_plugins.errors import QloraError

    with pytest.raises(QloraError, match=r"data: cannot write the data cache .*QLORA_PLUGINS_HOME.*data.cache: false"):
        load(tokenizer, data)
    assert len(load(tokenizer, data, cache=False).train) > 0


@pytest.mark.slow
def test_cli_run_and_resume_reuse_the_cache(home, builds, write_config, tmp_path):
    data = rows_file(tmp_path / "rows.jsonl", n=40)
    train = {"max_steps": 2, "batch_size": 4, "seed": 0, "checkpoint_every": 1, "threads": 1}
    config = write_config(base_config(data={"name": "instruction", "path": str(data), "max_length": 48}, train=train, export=None))
    first = invoke("run", config, "-o", tmp_path / "run", "--no-progress")
    assert first.exit_code == 0, first.output
    assert len(builds) == 1 and "rows tokenized in" in first.stderr
    resumed = invoke("run", config, "-o", tmp_path / "run", "--resume", "--set", "train.max_steps=3", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert len(builds) == 1 and "tokenized set from the cache" in resumed.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["training"]["train_examples"] == 36 and report["training"]["resumed_from_step"] == 2


def test_the_plugin_guide_data_format_example_runs(home, builds, tokenizer, tmp_path):
    import re
    import sys
    import types

    from conftest import REPO

    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    source = re.search(r"<!-- example: data_format -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert "qlora_plugins.core" not in source
    module = types.ModuleType("docs_example_data_format")
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, "docs/plugins.md <example: data_format>", "exec"), module.__dict__)
        registry = new_registry(plugins=[module])
        assert not registry.broken
        data = tmp_path / "words.jsonl"
        data.write_text("".join(json.dumps({"word": f"w{i}"}) + "\n" for i in range(12)), encoding="utf-8")
        fmt = registry.create("data_format", "words", {"path": "words.jsonl", "max_length": 16}, "data")
        context = DataContext(tokenizer, "causal_lm", 0, tmp_path, "data")
        first, second = fmt.load(context), fmt.load(context)
        assert len(builds) == 1 and second.train.tokenized.hit and len(first.train) + len(first.eval) == 12
        example = second.train[0]
        assert example["labels"] == example["input_ids"] and tokenizer.decode(example["input_ids"]).startswith("word: w")
        data.write_text(data.read_text() + json.dumps({"word": 5}) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"words.jsonl row 13 column 'word': expected text"):
            fmt.load(context)
    finally:
        sys.modules.pop(module.__name__, None)
