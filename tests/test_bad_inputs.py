"""A corpus of malformed inputs, each run through the CLI (`qlora run`, or `validate` where the
point is the config alone): one `Error:` line on stderr, exit code 2, no traceback, and nothing
half-written (every file under the test's directory is byte-for-byte as before, no new ones).

The corpus is data: one :class:`Case` a row, grouped by what is malformed (configs, datasets,
checkpoints, paths). A case names the config (a mapping merged into a small base config, or raw
text / bytes), extra files, an optional broken copy of the tiny Llama checkpoint, the output
path and fragments the error line must contain (with the test directory written as ``WORK``,
so that a fragment cannot match the test's own path). Cases that hit a bug in a file this suite
may not fix carry ``xfail`` (strict) with the reason.

Rows longer than ``data.max_length``: the ``instruction`` format truncates prompt + response to
``max_length`` tokens (the prompt stays masked) and drops rows whose prompt alone fills it; only
when that leaves no row is it an error (``data.max_length: every prompt ... raise max_length``).
:func:`test_long_rows_are_truncated_not_refused` pins the truncation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
import yaml
from conftest import INSTRUCTIONS, assert_user_error, base_config, invoke

# --- building blocks -----------------------------------------------------------------------


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in (mappings recursively; ``None`` deletes a key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def cfg(**changes: Any) -> dict:
    """The tests' small run config (tiny-llama source, the shipped instruction data) with changes."""
    return merge(base_config(), changes)


def on_data(name: str, **data: Any) -> dict:
    """A config training on the file ``name`` (written next to the config) with data options."""
    return cfg(data={"path": name, **data})


def on_model(**changes: Any) -> dict:
    """A config fine-tuning the (broken) checkpoint copied to ``model/``."""
    return merge(base_config(model={"path": "model"}), changes)


# checkpoint breakers: each gets a pristine copy of the tiny Llama checkpoint in ``model``


def truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def garbage_weights(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file \xff" * 64)


def corrupt_header(model: Path) -> None:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{" * 32  # the JSON header no longer parses
    weights.write_bytes(bytes(data))


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return edit


def remove(name: str) -> Callable[[Path], None]:
    def rm(model: Path) -> None:
        (model / name).unlink()

    return rm


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def put(model: Path) -> None:
        path = model / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return put


def pickled_weights(model: Path) -> None:
    """pytorch_model.bin instead of safetensors, a pickle that references a Python function."""
    import os

    import torch

    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": os.getcwd}, str(model / "pytorch_model.bin"))


def not_a_model(model: Path) -> None:
    shutil.rmtree(model)
    model.mkdir()
    (model / "README.md").write_text("holiday photos\n")
    (model / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")


def model_is_a_file(model: Path) -> None:
    shutil.rmtree(model)
    model.write_text("a file, not a checkpoint directory\n")


def model_missing(model: Path) -> None:
    shutil.rmtree(model)


def intact(model: Path) -> None:
    """The checkpoint is fine (the case is about the output path)."""


# --- the corpus ----------------------------------------------------------------------------

LONG_PROMPT = "word " * 200


@attrs.define
class Case:
    """One malformed input: what to write, how to call the CLI, what the error line says."""

    id: str
    config: dict | str | bytes | None  # mapping (written as YAML), raw text, raw bytes; None: not written
    fragments: tuple[str, ...]
    files: dict[str, str | bytes] = attrs.field(factory=dict)  # extra files next to the config
    model: Callable[[Path], None] | None = None  # breaks a copy of tiny-llama at ``model/``
    output: str = "out"  # relative to the test directory
    args: tuple[str, ...] = ()  # extra arguments after the config
    command: str = "run"
    config_name: str = "config.yaml"
    xfail: str | None = None  # a known bug outside the files this suite may fix (strict)

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


CASES = [
    # configs ------------------------------------------------------------------------------
    Case("yaml-unclosed-bracket", "model:\n  source: tiny-llama\ntrain:\n  max_steps: [3\n", ("config.yaml: invalid YAML at line",)),
    Case("yaml-bad-indentation", "model:\n  source: tiny-llama\n   path: x\n", ("invalid YAML at line 3",)),
    Case("yaml-tab-indentation", "model:\n\tsource: tiny-llama\n", ("invalid YAML",)),
    Case("yaml-top-level-list", "- model\n- train\n", ("must be a mapping of sections, got list",)),
    Case("yaml-top-level-scalar", "just some words\n", ("must be a mapping of sections, got str",)),
    Case("config-latin1-bytes", "model:\n  source: tiny-llama  # caf\xe9\n".encode("latin-1"), ("config.yaml: is not UTF-8 text",)),
    Case("toml-syntax-error", "[model\nsource = 'tiny-llama'\n", ("config.toml: invalid TOML",), config_name="config.toml"),
    Case("wrong-type-int", cfg(train={"max_steps": "ten"}), ("train.max_steps: must be an integer, got 'ten'",)),
    Case("wrong-type-bool-for-int", cfg(train={"batch_size": True}), ("train.batch_size: must be an integer, got True",)),
    Case("wrong-type-list", cfg(adapter={"target_modules": 5}), ("adapter.target_modules: ",)),
    Case("wrong-type-section", cfg(train=[1, 2]), ("train: must be a mapping, got [1, 2]",)),
    Case("wrong-type-plugin-name", cfg(quantizer={"name": 4}), ("quantizer.name: must be a string, got 4",)),
    Case("unknown-key-suggests", cfg(train={"max_step": 3}), ("train.max_step: unknown key (did you mean 'max_steps'?)",)),
    Case("unknown-plugin-key-suggests", cfg(adapter={"alpah": 8}), ("adapter.alpah: unknown key (did you mean 'alpha'?)",)),
    Case("unknown-plugin-key-lists-valid-keys", cfg(adapter={"rank": 8}), ("adapter.rank: unknown key; valid keys: alpha, bias, dropout",)),
    Case("unknown-section-suggests", cfg(optimiser={"lr": 1e-3}), ("optimiser: unknown section (did you mean 'optimizer'?)",)),
    Case(
        "unknown-plugin-suggests",
        cfg(quantizer={"name": "nf5"}),
        ("quantizer.name: unknown quantizer 'nf5' (did you mean 'nf4'?); available:",),
    ),
    Case("out-of-range-rank", cfg(adapter={"r": 0}), ("adapter.r: must be in [1, 4096], got 0",)),
    Case(
        "out-of-range-blocksize", cfg(quantizer={"blocksize": 100}), ("quantizer.blocksize: must be a power of two in [32, 4096], got 100",)
    ),
    Case("out-of-range-negative-lr", cfg(optimizer={"lr": -0.1}), ("optimizer.lr: must be > 0",)),
    Case(
        "non-finite-lr",
        "model: {source: tiny-llama}\ndata: {name: instruction, path: %s}\noptimizer: {name: adamw, lr: .nan}\n" % INSTRUCTIONS,
        ("optimizer.lr: must be a finite number",),
    ),
    Case("conflict-path-and-source", cfg(model={"path": "m", "source": "tiny-llama"}), ("model: set exactly one of 'path'",)),
    Case("conflict-neither-path-nor-source", cfg(model={"task": "causal_lm", "source": None}), ("model: set exactly one of 'path'",)),
    Case(
        "conflict-task-and-data-format",
        cfg(data={"name": "classification"}),
        ("data.name: data format 'classification' supports task(s) seq_cls",),
    ),
    Case("conflict-duplicate-exporter", cfg(export=["adapter", "adapter"]), ("export[1].name: duplicate exporter 'adapter'",)),
    Case("training-without-data", cfg(data=None), ("data: is required when train.enabled is true",)),
    Case("bad-set-override", cfg(), ("--set: expected KEY=VALUE",), args=("--set", "train.max_steps")),
    Case("bad-instruction-template", cfg(data={"template": "{question}"}), ("data.template: unknown placeholder {question}",)),
    # datasets -----------------------------------------------------------------------------
    Case(
        "data-missing-columns",
        on_data("qa.jsonl"),
        ("data.path: qa.jsonl lacks column(s) instruction, output; it has: question, answer",),
        files={"qa.jsonl": '{"question": "q", "answer": "a"}\n'},
    ),
    Case("data-empty-file", on_data("empty.jsonl"), ("data.path: ", "empty.jsonl is empty"), files={"empty.jsonl": ""}),
    Case("data-blank-lines", on_data("blank.jsonl"), ("blank.jsonl has no rows",), files={"blank.jsonl": "\n\n\n"}),
    Case("data-csv-header-only", on_data("header.csv"), ("header.csv has no rows",), files={"header.csv": "instruction,output\n"}),
    Case("data-json-empty-list", on_data("rows.json"), ("rows.json has no rows",), files={"rows.json": "[]"}),
    Case(
        "data-latin1-bytes",
        on_data("latin1.jsonl"),
        ("latin1.jsonl is not UTF-8 text (byte ",),
        files={"latin1.jsonl": '{"instruction": "Say caf\xe9", "output": "caf\xe9"}\n'.encode("latin-1")},
    ),
    Case(
        "data-non-json-line",
        on_data("broken.jsonl"),
        ("data.path: cannot parse ", "broken.jsonl"),
        files={"broken.jsonl": '{"instruction": "a", "output": "b"}\nthis line is not JSON\n{"instruction": "c", "output": "d"}\n'},
    ),
    Case(
        "data-truncated-json-line",
        on_data("cut.jsonl"),
        ("data.path: cannot parse ", "cut.jsonl"),
        files={"cut.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp\n'},
    ),
    Case("data-json-scalar", on_data("scalar.json"), ("data.path: ", "scalar.json"), files={"scalar.json": "42\n"}),
    Case(
        "data-prompts-longer-than-max-length",
        on_data("long.jsonl", max_length=16),
        ("data.max_length: every prompt in long.jsonl is at least 16 tokens",),
        files={"long.jsonl": json.dumps({"instruction": LONG_PROMPT, "output": "ok"}) + "\n"},
    ),
    Case(
        "data-unsupported-type",
        on_data("rows.xlsx"),
        ("data.path: rows.xlsx: unsupported file type '.xlsx'",),
        files={"rows.xlsx": "PK\x03\x04"},
    ),
    Case("data-path-is-a-directory", on_data("somedir"), ("data.path: not a file: ",), files={"somedir/rows.jsonl": "{}\n"}),
    Case(
        "data-text-shorter-than-a-block",
        cfg(data={"name": "text", "path": "tiny.txt", "max_length": 512}),
        ("fewer than one block of max_length=512",),
        files={"tiny.txt": "too short\n"},
    ),
    Case(
        "data-single-label-class",
        cfg(model={"source": "tiny-bert", "task": "seq_cls"}, data={"name": "classification", "path": "one.csv"}),
        ("one.csv has a single label class",),
        files={"one.csv": "text,label\na,x\nb,x\nc,x\n"},
    ),
    # checkpoints --------------------------------------------------------------------------
    Case("ckpt-truncated-safetensors", on_model(), ("model.safetensors", "corrupt or truncated"), model=truncate_weights),
    Case("ckpt-garbage-safetensors", on_model(), ("model.safetensors", "corrupt or truncated"), model=garbage_weights),
    Case("ckpt-corrupt-header", on_model(), ("model.safetensors", "corrupt or truncated"), model=corrupt_header),
    Case(
        "ckpt-shapes-do-not-match-config", on_model(), ("model.path: cannot load ", "shape"), model=edit_config(hidden_size=96, head_dim=24)
    ),
    Case("ckpt-pickled-weights-with-globals", on_model(), ("model.path: ", "pytorch_model.bin"), model=pickled_weights),
    Case(
        "ckpt-missing-config-json", on_model(), ("model.path: ", "is not a model directory (no config.json)"), model=remove("config.json")
    ),
    Case("ckpt-config-json-not-json", on_model(), ("config.json is not valid JSON",), model=write("config.json", "{not json")),
    Case("ckpt-config-without-model-type", on_model(), ("has no 'model_type'",), model=edit_config(model_type=None)),
    Case("ckpt-unknown-model-type", on_model(), ("model.path: ", "nonexistent-arch"), model=edit_config(model_type="nonexistent-arch")),
    Case(
        "ckpt-index-names-a-missing-shard",
        on_model(),
        ("names the shard model-00002-of-00002.safetensors, which is missing",),
        model=write("model.safetensors.index.json", json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})),
    ),
    Case("ckpt-no-weights", on_model(), ("has no weights",), model=remove("model.safetensors")),
    Case("ckpt-not-a-model-directory", on_model(), ("is not a model directory (no config.json)",), model=not_a_model),
    Case("ckpt-path-is-a-file", on_model(), ("model.path: not a directory: ",), model=model_is_a_file),
    # paths --------------------------------------------------------------------------------
    Case("path-missing-config", None, ("WORK/nope.yaml: config file not found",), config_name="nope.yaml"),
    Case(
        "path-config-is-a-directory",
        None,
        ("WORK/cfgdir: is a directory, not a config file",),
        files={"cfgdir/a.yaml": "model: {}\n"},
        config_name="cfgdir",
    ),
    Case("path-missing-model", on_model(), ("model.path: model directory not found: ",), model=model_missing),
    Case(
        "path-missing-data",
        cfg(data={"path": "nowhere/rows.jsonl"}),
        ("data.path: data file not found: ", "rows.jsonl"),
        command="validate",
    ),
    Case("path-output-under-a-file", cfg(), ("--output: ", "somefile"), files={"somefile": "a regular file\n"}, output="somefile/run"),
    Case("path-output-inside-model", on_model(), ("--output: ", "inside the model directory"), model=intact, output="model/run"),
    Case("path-output-is-a-file", cfg(), ("--output: WORK/out exists and is not a directory",), files={"out": "a regular file\n"}),
    Case("path-output-not-empty", cfg(), ("exists and is not empty; pass --force",), files={"out/notes.txt": "keep me\n"}),
    Case(
        "path-resume-not-a-run",
        cfg(),
        ("--resume: ", "is not a qlora run directory"),
        files={"out/notes.txt": "keep me\n"},
        args=("--resume",),
    ),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (directories as ``dir``)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_the_corpus_is_big_enough_and_covers_every_group():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    for group in ("yaml-", "wrong-type", "unknown-key", "out-of-range", "conflict-", "data-", "ckpt-", "path-"):
        assert any(i.startswith(group) for i in ids), group


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_llama_dir: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if case.model is not None:
        shutil.copytree(tiny_llama_dir, work / "model")
        case.model(work / "model")
    for name, content in case.files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    config = work / case.config_name
    if case.config is not None:
        if isinstance(case.config, dict):
            config.write_text(yaml.safe_dump(case.config, sort_keys=False), encoding="utf-8")
        elif isinstance(case.config, bytes):
            config.write_bytes(case.config)
        else:
            config.write_text(case.config, encoding="utf-8")
    before = snapshot(work)
    args = [case.command, config, *case.args]
    if case.command == "run":
        args += ["--output", work / case.output, "--no-progress"]
    result = invoke(*args)

    line = assert_user_error(result).replace(str(work), "WORK")  # fragments must not match the test's own path
    for fragment in case.fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in result.stderr
    assert snapshot(work) == before, "the failed command wrote or changed files"


# --- rows longer than max_length -----------------------------------------------------------


def test_long_rows_are_truncated_not_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A response longer than ``max_length`` is cut to ``max_length`` tokens (prompt masked);
    a row whose prompt alone fills ``max_length`` is dropped; the rest train."""
    from qlora_plugins.core.interfaces import DataContext
    from qlora_plugins.core.modeling import load_tokenizer
    from qlora_plugins.core.registry import create_registry

    rows = [
        {"instruction": "Spell it.", "output": "abc " * 100},  # response far past max_length
        {"instruction": LONG_PROMPT, "output": "dropped"},  # the prompt alone fills max_length
        {"instruction": "Say hi.", "output": "hi"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plugin = create_registry(load_entrypoints=False).create(
        "data_format", "instruction", {"path": str(path), "max_length": 64, "eval_fraction": 0.0}
    )
    splits = plugin.load(DataContext(load_tokenizer(tiny_llama_dir), "causal_lm", 0, tmp_path))
    assert len(splits.train) == 2
    lengths = sorted(len(e["input_ids"]) for e in splits.train)
    assert lengths[-1] == 64  # truncated to max_length
    for example in splits.train:
        assert len(example["labels"]) == len(example["input_ids"])
        assert any(label != -100 for label in example["labels"])
