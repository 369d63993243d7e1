"""`qlora export RUN_DIR` on a real (briefly) trained run, the pipeline's export section with the
new exporters, and the bad-input cases: each one clear line, exit code 2, nothing half-written and
an earlier export untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, base_config, invoke

from qlora_plugins.core.checkpoint_format import file_sha256

#: tiny-llama is a random model trained for two steps: its next-token distributions are nearly flat,
#: so 4-bit re-quantization flips many near-ties; top-1 agreement is not meaningful for it.
NO_TOP1 = "--option=merged_4bit.tolerance.min_top1=0"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: torch's thread pool only adds overhead (and contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trained_run(tmp_path_factory) -> Path:
    """`qlora run` with the adapter and a bf16 merged export in its export section; made once per
    session (test_gguf_plugin.py uses it too)."""
    root = tmp_path_factory.getbasetemp() / "export-trained-run"
    run = root / "run"
    if (run / "run.json").is_file() and json.loads((run / "run.json").read_text()).get("status") == "completed":
        return run
    root.mkdir(exist_ok=True)
    config = base_config(
        train={"max_steps": 2, "batch_size": 4, "seed": 0},
        export=[{"name": "adapter"}, {"name": "merged", "dtype": "bfloat16", "tolerance": {"min_top1": 0.5}}],
    )
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = invoke("run", path, "-o", run, "--no-progress", "--force")
    assert result.exit_code == 0, (result.output, result.exception)
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir) -> Path:
    return make_trained_run(tmp_path_factory)


def digest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): file_sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_run(run: Path, dest: Path, adapter: bool = True) -> Path:
    dest.mkdir()
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    if adapter:
        shutil.copytree(run / "adapter", dest / "adapter")
    return dest


def point_at(run: Path, model_dir: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["path"] = str(model_dir)
    config["model"]["source"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.slow
def test_the_pipeline_verifies_its_exports(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    merged = report["exports"]["merged"]
    assert merged["dtype"] == "bfloat16" and merged["fidelity"]["status"] == "passed"
    assert merged["fidelity"]["tolerance"]["min_top1"] == 0.5
    assert report["exports"]["adapter"]["fidelity"]["max_abs_diff"] == 0.0
    manifest = json.loads((trained_run / "exports" / "merged" / "manifest.json").read_text())
    assert manifest["config"]["model"]["path"].endswith("tiny-llama-v1") and manifest["fidelity"] == merged["fidelity"]


@pytest.mark.slow
def test_export_refuses_an_existing_export_then_replaces_it_with_force(trained_run):
    target = trained_run / "exports" / "merged"
    before = digest(target)
    result = invoke("export", trained_run, "--exporter", "merged")
    assert_user_error(result, "exists and is not empty", "--force")
    assert digest(target) == before

    result = invoke("export", trained_run, "-e", "merged", "--force")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "qlora export: completed" in result.stdout and "fidelity" in result.stdout
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["exporter"]["options"]["dtype"] == "bfloat16"  # the run's own options for `merged`
    # the figures come from the run's held-out examples, as in the run itself
    assert manifest["fidelity"]["probe"]["source"] == "held-out examples"
    assert json.loads((trained_run / "report.json").read_text())["exports"]["merged"]["fidelity"] == manifest["fidelity"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_export_several_to_an_output_directory_as_json(trained_run, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "export",
        trained_run,
        "-e",
        "adapter",
        "-e",
        "merged_4bit",
        "-o",
        out,
        "--json",
        "--option",
        "merged_4bit.correction_rank=4",
        NO_TOP1,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert set(data) == {"adapter", "merged_4bit"}
    assert data["adapter"]["path"] == str(out / "adapter") and (out / "adapter" / "adapter_model.safetensors").is_file()
    m4 = data["merged_4bit"]
    assert m4["format"] == "bitsandbytes" and m4["correction"]["rank"] == 4 and m4["fidelity"]["status"] == "passed"
    assert (out / "merged_4bit" / "correction" / "adapter_model.safetensors").is_file()
    assert m4["requantization"]["with_correction"]["weight_rel_error"] < m4["requantization"]["weight_rel_error"]
    for name in data:
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert {f["path"] for f in manifest["files"]} == set(data[name]["files"])


@pytest.mark.slow
def test_a_tolerance_exceeded_leaves_the_earlier_export_untouched(trained_run, tmp_path):
    out = tmp_path / "m4"
    first = invoke("export", trained_run, "-e", "merged_4bit", "-o", out, NO_TOP1)
    assert first.exit_code == 0, (first.output, first.exception)
    before = digest(out)
    result = invoke("export", trained_run, "-e", "merged_4bit", "-o", out, "--force", "--option", "tolerance.max_kl=0")
    line = assert_user_error(result, "export 'merged_4bit' failed its fidelity check", "> max_kl 0", "nothing was written")
    assert "tolerance.max_kl" in line
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m4"]


def test_unknown_exporter(trained_run):
    result = invoke("export", trained_run, "-e", "mergd")
    assert_user_error(result, "unknown exporter 'mergd'", "did you mean 'merged'", "available: adapter")


def test_bad_exporter_option(trained_run):
    assert_user_error(
        invoke("export", trained_run, "-e", "merged", "--option", "dtype=float64", "--force"), "--exporter merged.dtype", "float64"
    )
    assert_user_error(
        invoke("export", trained_run, "-e", "merged", "--option", "tolerance.max_kll=1", "--force"), "max_kll", "did you mean 'max_kl'"
    )
    assert_user_error(invoke("export", trained_run, "-e", "merged", "--option", "directory=../x", "--force"), "directory")


def test_not_a_run_and_no_adapter(trained_run, tmp_path):
    assert_user_error(invoke("export", tmp_path / "missing", "-e", "merged"), "is not a directory")
    assert_user_error(invoke("export", tmp_path, "-e", "merged"), "not a qlora run directory")
    run = copy_run(trained_run, tmp_path / "run", adapter=False)
    assert_user_error(invoke("export", run, "-e", "merged"), "has no trained adapter")
    assert not (run / "exports").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_adapter_file(trained_run, tmp_path, damage):
    run = copy_run(trained_run, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000] if damage == "truncate" else b"not a safetensors file at all")
    line = assert_user_error(invoke("export", run, "-e", "merged"), "adapter_model.safetensors", "corrupt or truncated")
    if damage == "truncate":
        assert "truncated: tensors need" in line
    assert not (run / "exports").exists()


def test_adapter_of_another_model_type(trained_run, tmp_path, tiny_gpt2_dir):
    run = copy_run(trained_run, tmp_path / "run")
    point_at(run, tiny_gpt2_dir)
    assert_user_error(invoke("export", run, "-e", "merged"), "trained on a llama model", "is a gpt2 model")
    assert not (run / "exports").exists()


def test_adapter_of_another_shape(trained_run, tmp_path, tiny_llama_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "wider-llama"
    config = LlamaConfig.from_pretrained(str(tiny_llama_dir))
    config.intermediate_size = 256
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(other))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, other / name)
    run = copy_run(trained_run, tmp_path / "run")
    point_at(run, other)
    assert_user_error(invoke("export", run, "-e", "merged"), "does not match the base model", str(other), "size mismatch")
    assert not (run / "exports").exists()


def test_output_may_not_replace_the_run(trained_run):
    assert_user_error(invoke("export", trained_run, "-e", "merged", "-o", trained_run, "--force"), "would replace the run directory")
    assert_user_error(
        invoke("export", trained_run, "-e", "merged", "-o", trained_run / "adapter", "--force"), "would replace the run directory"
    )
    assert (trained_run / "adapter" / "adapter_config.json").is_file()


def test_export_help():
    result = invoke("export", "--help")
    assert result.exit_code == 0
    for fragment in ("RUN_DIR", "--exporter", "--output", "--option", "--force", "--json", "manifest.json"):
        assert fragment in result.stdout
