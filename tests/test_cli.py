"""The `qlora` command line: bad input (one `Error:` line, exit code 2, no traceback, nothing
written), `validate`, `plugins`, help texts, and start-up time without heavy imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLASSIFY, assert_user_error, base_config, invoke

from qlora_plugins.core.interfaces import KINDS
from qlora_plugins.errors import QloraError


def qlora_script() -> str:
    script = Path(sys.executable).parent / "qlora"
    return str(script) if script.exists() else shutil.which("qlora")


def run_bad(write_config, tmp_path, config: dict, *overrides: str):
    out = tmp_path / "out"
    args = ["run", write_config(config)]
    for item in overrides:
        args += ["--set", item]
    result = invoke(*args, "--output", out, "--no-progress")
    return result, out


PREFLIGHT = [
    # (overrides, fragments of the error line)
    (["quantizer.name=nf5"], ["quantizer.name: unknown quantizer 'nf5' (did you mean 'nf4'?); available: ", "fp4", "none"]),
    (["optimizer.name=adamw8bit"], ["optimizer.name: unknown optimizer 'adamw8bit' (did you mean 'adamw_8bit'?)", "paged_adamw"]),
    (["adapter.name=lora2"], ["unknown adapter 'lora2' (did you mean 'lora'?); available: full, lora"]),
    (["export.0.name=adaptor"], ["export[0].name: unknown exporter 'adaptor' (did you mean 'adapter'?)"]),
    (["model.source=tiny-lama"], ["model.source: unknown model source 'tiny-lama' (did you mean 'tiny-llama'?)"]),
    (["train.max_steps=ten"], ["train.max_steps: must be an integer, got 'ten'"]),
    (["quantizer.double_quant=maybe"], ["quantizer.double_quant: must be true or false, got 'maybe'"]),
    (["adapter.r=many"], ["adapter.r: must be an integer, got 'many'"]),
    (["quantizer.blocksize=100"], ["quantizer.blocksize: must be a power of two in [32, 4096], got 100"]),
    (["data.eval_fraction=2"], ["data.eval_fraction: must be in [0.0, 0.9], got 2.0"]),
    (["optimizer.lr=-1"], ["optimizer.lr: must be > 0, got -1.0"]),
    (["quantizer.blocksze=64"], ["quantizer.blocksze: unknown key (did you mean 'blocksize'?)"]),
    (["quantiser.name=nf4"], ["quantiser: unknown section (did you mean 'quantizer'?)"]),
    (["data.path=missing.jsonl"], ["data.path: data file not found: ", "missing.jsonl"]),
    (["data.path=data.xlsx"], ["data.path: data file not found"]),
    (
        ["model.task=seq_cls", "data.name=classification", f"data.path={CLASSIFY}"],
        ["model.task: model source 'tiny-llama' is a causal_lm model, but model.task is seq_cls"],
    ),
    (["data.name=classification"], ["data.name: data format 'classification' supports task(s) seq_cls, not model.task=causal_lm"]),
    (["train.max_steps"], ["--set: expected KEY=VALUE"]),
    (["train.device=cuda"] if not __import__("torch").cuda.is_available() else ["train.device=gpu"], ["train.device: "]),
]


@pytest.mark.parametrize("overrides, fragments", PREFLIGHT, ids=[o[0] for o, _ in PREFLIGHT])
def test_bad_config_values(overrides, fragments, write_config, tmp_path):
    result, out = run_bad(write_config, tmp_path, base_config(), *overrides)
    line = assert_user_error(result, *fragments)
    assert result.stderr.strip() == line  # nothing else on stderr: caught before any work
    assert not out.exists()


def test_config_file_problems(write_config, tmp_path):
    out = tmp_path / "out"
    bad_yaml = write_config("model:\n  source: tiny-llama\ntrain:\n  max_steps: 3\n  batch_size: [4\n", "bad.yaml")
    line = assert_user_error(invoke("run", bad_yaml, "-o", out), f"{bad_yaml}: invalid YAML at line ")
    assert int(line.split("at line ")[1].split(",")[0]) in (5, 6)
    assert_user_error(invoke("run", tmp_path / "nope.yaml", "-o", out), "nope.yaml: config file not found")
    assert_user_error(invoke("run", write_config({"data": {"name": "text", "path": "x"}}, "nomodel.yaml"), "-o", out), "model: is required")
    assert_user_error(
        invoke("run", write_config(base_config(model={"source": "tiny-llama", "path": "m"}), "both.yaml"), "-o", out),
        "model: set exactly one of 'path'",
    )
    assert not out.exists()


def test_missing_model_directory(write_config, tmp_path):
    result, out = run_bad(write_config, tmp_path, base_config(model={"path": str(tmp_path / "no-model")}))
    assert_user_error(result, "model.path: model directory not found: ", "no-model")
    assert not out.exists()


def test_directory_without_config_json(write_config, tmp_path):
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "weights.txt").write_text("x")
    result, out = run_bad(write_config, tmp_path, base_config(model={"path": "empty-model"}))
    assert_user_error(result, "model.path: ", "empty-model is not a model directory (no config.json)")
    assert not out.exists()


def test_model_directory_without_weights(write_config, tmp_path, tiny_llama_dir):
    model = tmp_path / "no-weights"
    model.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", model / "config.json")
    result, out = run_bad(write_config, tmp_path, base_config(model={"path": str(model)}))
    assert_user_error(result, "has no weights")
    assert not out.exists()


def test_real_model_directory_by_path(write_config, tmp_path, tiny_llama_dir):
    """model.path to an ordinary checkpoint directory works (validate: no model is loaded)."""
    result = invoke("validate", write_config(base_config(model={"path": str(tiny_llama_dir)})))
    assert result.exit_code == 0, result.output


def test_dataset_without_the_needed_columns(write_config, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    result, out = run_bad(write_config, tmp_path, base_config(), "data.path=qa.jsonl")
    assert_user_error(result, "data.path: qa.jsonl lacks column(s) instruction, output; it has: question, answer")
    assert not out.exists()


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("header.csv", "instruction,output\n"), ("blank.jsonl", "\n\n")])
def test_empty_dataset(name, content, write_config, tmp_path):
    (tmp_path / name).write_text(content)
    result, out = run_bad(write_config, tmp_path, base_config(), f"data.path={name}")
    assert_user_error(result, "data.path: ", name, "empty" if not content else "has no rows")
    assert not out.exists()


def test_classification_labels_problem(write_config, tmp_path):
    (tmp_path / "one.csv").write_text("text,label\na,x\nb,x\n")
    config = base_config(model={"source": "tiny-bert", "task": "seq_cls"}, data={"name": "classification", "path": "one.csv"})
    result, out = run_bad(write_config, tmp_path, config)
    assert_user_error(result, "one.csv has a single label class")
    assert not out.exists()


def test_nothing_trainable_is_a_user_error(write_config, tmp_path):
    result, _ = run_bad(write_config, tmp_path, base_config(), "adapter.target_modules=[nonexistent]")
    assert_user_error(result, "adapter.target_modules: ['nonexistent'] matches no module of the model")


def test_nothing_trainable_writes_nothing(write_config, tmp_path):
    result, out = run_bad(write_config, tmp_path, base_config(), "adapter.target_modules=[nonexistent]")
    assert result.exit_code == 2
    assert not out.exists()


def test_output_directory_that_is_not_empty(write_config, tmp_path):
    config = write_config(base_config())
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke("run", config, "-o", out, "--no-progress")
    assert_user_error(result, "precious exists and is not empty; pass --force to replace it")
    assert result.stderr.strip().startswith("Error:")
    # --force only ever replaces a previous run directory, never an arbitrary one
    forced = invoke("run", config, "-o", out, "--no-progress", "--force")
    assert_user_error(forced, "is not a qlora run directory", "refusing to delete it even with --force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_output_that_is_a_file(write_config, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = invoke("run", write_config(base_config()), "-o", target, "--no-progress")
    assert target.read_text() == "x"
    assert_user_error(result, "file.txt")


def test_output_inside_the_model_directory_is_refused(write_config, tmp_path, tiny_llama_dir):
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    result = invoke("run", write_config(base_config()), "-o", tiny_llama_dir / "run", "--no-progress")
    assert_user_error(result, "inside the model directory")
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


def test_debug_shows_the_exception(write_config, tmp_path):
    config = write_config(base_config())
    result = invoke("--debug", "run", config, "--set", "quantizer.blocksize=100", "-o", tmp_path / "o")
    assert result.exit_code != 0 and isinstance(result.exception, QloraError)
    assert "must be a power of two" in str(result.exception)


# --- validate --------------------------------------------------------------------------------


def test_validate_ok_without_loading_a_model(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_PLUGINS_HOME", str(tmp_path / "fresh-home"))
    path = write_config(base_config())
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{path}: valid (quantizer=nf4 adapter=lora optimizer=adamw data=instruction export=adapter)"
    assert not (tmp_path / "fresh-home").exists()  # the model source was not materialized


def test_validate_with_overrides_and_failures(write_config, tmp_path):
    path = write_config(base_config())
    ok = invoke("validate", path, "--set", "quantizer.name=fp4", "--set", "export=[]")
    assert ok.exit_code == 0 and "quantizer=fp4" in ok.stdout and "export=" not in ok.stdout
    assert_user_error(invoke("validate", path, "--set", "quantizer.blocksize=100"), f"{path}: quantizer.blocksize: must be a power of two")
    assert_user_error(invoke("validate", path, "--set", "data.path=gone.jsonl"), "data.path: data file not found")
    seq = write_config(
        base_config(model={"source": "tiny-bert", "task": "seq_cls"}, data={"name": "classification", "path": str(CLASSIFY)}), "seq.yaml"
    )
    assert invoke("validate", seq).exit_code == 0


# --- plugins ---------------------------------------------------------------------------------


def test_plugins_table():
    result = invoke("plugins")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    rows = {tuple(line.split()[:3]) for line in lines[1:]}
    for kind, name in [
        ("quantizer", "nf4"),
        ("quantizer", "fp4"),
        ("quantizer", "none"),
        ("adapter", "lora"),
        ("optimizer", "paged_adamw"),
        ("optimizer", "adamw"),
        ("optimizer", "adamw_8bit"),
        ("exporter", "adapter"),
        ("data_format", "instruction"),
        ("model_source", "tiny-llama"),
    ]:
        assert (kind, name, "qlora-plugins") in rows
    assert not [line for line in lines if line.startswith(("BROKEN", "BLOCKED"))]


def test_plugins_json():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) == {"plugins", "broken", "blocked"} and data["broken"] == [] and data["blocked"] == []
    for row in data["plugins"]:
        assert {"kind", "name", "distribution", "version", "description", "class", "builtin", "replaces"} <= set(row)
        assert row["kind"] in KINDS and row["description"]
    nf4 = next(r for r in data["plugins"] if r["name"] == "nf4")
    assert nf4["distribution"] == "qlora-plugins" and nf4["builtin"] is True
    paged = next(r for r in data["plugins"] if r["name"] == "paged_adamw")
    assert "CUDA" in paged["description"] or "paged" in paged["description"].lower()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_plugins_by_kind(kind):
    data = json.loads(invoke("plugins", "--kind", kind, "--json").stdout)
    assert data["plugins"] and {r["kind"] for r in data["plugins"]} == {kind}
    table = invoke("plugins", "--kind", kind).stdout.splitlines()[1:]
    assert {line.split()[0] for line in table} == {kind}


def test_plugins_unknown_kind_is_a_usage_error():
    result = invoke("plugins", "--kind", "quantiser")
    assert result.exit_code == 2 and "Invalid value for '--kind'" in result.stderr


# --- help ------------------------------------------------------------------------------------


def test_root_help_lists_the_commands():
    from qlora_plugins.cli import cli

    result = invoke("--help")
    assert result.exit_code == 0
    assert "QLoRA fine-tuning as swappable plugins" in result.stdout
    for name in ("run", "validate", "plugins"):
        assert name in cli.commands
    for name in cli.commands:
        assert f"  {name}" in result.stdout
    for option in ("--debug", "--block", "--no-autoload", "--version"):
        assert option in result.stdout


def test_every_subcommand_has_complete_help():
    from qlora_plugins.cli import cli

    for name, command in cli.commands.items():
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        assert command.help and " ".join(command.help.split("\n")[0].split()) in " ".join(result.stdout.split()), name
        for param in command.params:
            if getattr(param, "opts", None) and param.param_type_name == "option":
                assert param.help, f"{name} {param.opts[0]} has no help"
                assert param.opts[0] in result.stdout
    run_help = invoke("run", "--help").stdout
    for option in ("--set KEY=VALUE", "--output", "--force", "--json", "--no-progress"):
        assert option in run_help


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "0.1.0" in result.stdout


# --- start-up time ---------------------------------------------------------------------------


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_PLUGINS_")}
    return env


@pytest.mark.parametrize("args", [["--help"], ["plugins"]])
def test_console_script_answers_fast(args, tmp_path):
    script = qlora_script()
    assert script, "the qlora console script is not installed"
    subprocess.run([script, "--version"], capture_output=True, timeout=60, cwd=tmp_path)  # warm the OS file cache
    started = time.perf_counter()
    out = subprocess.run([script, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_clean_env())
    elapsed = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    assert elapsed < 3.0, f"qlora {' '.join(args)} took {elapsed:.2f}s"  # target < 1 s; generous on a busy machine


def test_cli_imports_no_heavy_modules(tmp_path):
    code = """
import sys
from qlora_plugins.cli import main
for args in (["--help"], ["plugins"], ["plugins", "--json"], ["validate", "--help"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
heavy = sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "matplotlib", "safetensors") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""
    env = {**_clean_env(), "QLORA_PLUGINS_DISABLE_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY", out.stdout[-500:]
