"""Nothing lost, nothing escapes: ``--force`` replaces only what qlora provably wrote, never a
directory holding an input, and no write, replacement or deletion leaves a run directory through a
symbolic link (docs/security.md, "What --force may replace" and "Links").

Each scenario starts from a copy of one real finished run and asserts, besides the one-line error
and exit code 2, that the user's files are still there byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import assert_user_error, base_config, invoke


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links are recorded by their target, not followed)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, qlora_home) -> Path:
    """One real run (3 steps, a checkpoint each step, the adapter export)."""
    root = tmp_path_factory.mktemp("finished")
    config = write_yaml(
        root / "c.yaml", base_config(train={"max_steps": 3, "batch_size": 4, "seed": 0, "checkpoint_every": 1, "keep_checkpoints": 3})
    )
    result = invoke("run", config, "-o", root / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (links inside are added by each test)."""
    target = tmp_path / "run"
    shutil.copytree(finished_run, target, symlinks=True)
    return target


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A directory of the user's own files that no command may change."""
    home = tmp_path / "precious"
    (home / "src").mkdir(parents=True)
    (home / "src" / "thesis.tex").write_text("five years of work\n")
    (home / "notes.txt").write_text("do not delete\n")
    return home


@pytest.fixture
def config(tmp_path) -> Path:
    return write_yaml(tmp_path / "config.yaml", base_config())


# --- --force on qlora run -------------------------------------------------------------------


def test_force_refuses_a_directory_whose_run_json_is_someone_elses(config, tmp_path):
    target = tmp_path / "webapp"
    (target / "src").mkdir(parents=True)
    (target / "run.json").write_text('{"name": "web app"}')
    (target / "src" / "thesis.tex").write_text("work\n")
    before = snapshot(target)
    line = assert_user_error(invoke("run", config, "-o", target, "--force", "--no-progress"), "not a qlora run directory")
    assert "run.json" in line
    assert snapshot(target) == before


@pytest.mark.parametrize("marker", ["not json", "[1, 2]", '{"tool": "qlora-plugins-fork"}', ""])
def test_force_refuses_a_run_json_that_does_not_name_the_tool(marker, config, tmp_path):
    target = tmp_path / "other"
    target.mkdir()
    (target / "run.json").write_text(marker)
    (target / "data.csv").write_text("a,b\n")
    before = snapshot(target)
    assert_user_error(invoke("run", config, "-o", target, "--force", "--no-progress"), "even with --force")
    assert snapshot(target) == before


@pytest.mark.parametrize(
    "where", ["src/thesis.tex", "exports/notes.txt", "exports/mine/file.txt", "checkpoints/keep.txt", "adapter-old/x.bin"]
)
@pytest.mark.slow
def test_force_refuses_a_run_directory_holding_files_a_run_does_not_write(where, run_copy, config):
    extra = run_copy / where
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text("mine\n")
    before = snapshot(run_copy)
    assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"), "even with --force")
    assert snapshot(run_copy) == before


def test_force_refuses_a_run_directory_with_an_unlisted_file_in_an_export(run_copy, config):
    (run_copy / "exports" / "adapter" / "extra.txt").write_text("added by hand\n")
    before = snapshot(run_copy)
    line = assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"))
    assert "exports/adapter" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("link_at", ["exports/adapter/link", "checkpoints/step-00000003/link", "adapter/link", "loss.png"])
def test_force_never_follows_a_link_inside_the_run_directory(link_at, run_copy, user_dir, config):
    link = run_copy / link_at
    if link.exists():
        link.unlink()
    link.symlink_to(user_dir, target_is_directory=True)
    before, theirs = snapshot(run_copy), snapshot(user_dir)
    line = assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"))
    assert "symbolic link" in line
    assert snapshot(run_copy) == before and snapshot(user_dir) == theirs


def test_force_refuses_a_previous_run_that_holds_the_config(run_copy):
    config = write_yaml(run_copy / "config.yaml", base_config())
    before = snapshot(run_copy)
    assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"), "the config file", "an input of this command")
    assert snapshot(run_copy) == before


def fake_export(directory: Path, files: dict[Path, bytes]) -> None:
    """An export directory as qlora writes one: the files and a manifest listing them."""
    directory.mkdir(parents=True)
    listed = []
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
        listed.append({"path": str(rel), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (directory / "manifest.json").write_text(json.dumps({"manifest_version": 1, "tool": "qlora-plugins", "files": listed}))


def test_force_refuses_a_previous_run_that_holds_the_base_model(run_copy, tiny_llama_dir, tmp_path):
    merged = run_copy / "exports" / "merged"
    fake_export(merged, {Path(p.name): p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()})
    config = write_yaml(tmp_path / "further.yaml", base_config(model={"path": str(merged)}))
    before = snapshot(run_copy)
    assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"), "model.path", "an input of this command")
    assert snapshot(run_copy) == before


def test_force_refuses_a_previous_run_that_holds_the_data(run_copy, tmp_path):
    from conftest import INSTRUCTIONS

    fake_export(run_copy / "exports" / "data", {Path("rows.jsonl"): INSTRUCTIONS.read_bytes()})
    config = write_yaml(
        tmp_path / "c.yaml",
        base_config(data={"name": "instruction", "path": str(run_copy / "exports" / "data" / "rows.jsonl"), "max_length": 64}),
    )
    before = snapshot(run_copy)
    assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"), "the data", "an input of this command")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_force_replaces_a_previous_run_and_leaves_nothing_aside(run_copy, config):
    old_adapter = snapshot(run_copy / "adapter")
    result = invoke("run", config, "-o", run_copy, "--force", "--no-progress", "--set", "train.seed=1")
    assert result.exit_code == 0, result.output
    assert not (run_copy / "checkpoints").exists()  # the new run keeps no checkpoints: the old ones are gone
    assert snapshot(run_copy / "adapter") != old_adapter
    assert not [p for p in run_copy.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_failed_force_run_puts_the_previous_run_back(run_copy, config, monkeypatch):
    from qlora_plugins.core import pipeline

    before = snapshot(run_copy)

    def broken_exports(*args, **kwargs):
        raise pipeline.QloraError("the exporter failed on purpose")

    monkeypatch.setattr(pipeline, "run_exports", broken_exports)
    assert_user_error(invoke("run", config, "-o", run_copy, "--force", "--no-progress"), "failed on purpose")
    assert snapshot(run_copy) == before
    assert not [p for p in run_copy.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_completed_run_removes_what_an_earlier_killed_force_run_set_aside(run_copy, config):
    aside = run_copy.parent / f".{run_copy.name}.replaced-999-0.tmp"
    shutil.copytree(run_copy, aside)
    result = invoke("run", config, "-o", run_copy, "--force", "--no-progress")
    assert result.exit_code == 0, result.output
    assert not aside.exists()


# --- qlora export ----------------------------------------------------------------------------


def test_export_force_refuses_a_directory_that_is_not_an_export(run_copy, user_dir):
    before = snapshot(user_dir)
    line = assert_user_error(invoke("export", run_copy, "-e", "adapter", "-o", user_dir, "--force"), "--output")
    assert "not an export" in line
    assert snapshot(user_dir) == before


def test_export_force_refuses_an_export_with_files_its_manifest_does_not_list(run_copy, tmp_path):
    target = tmp_path / "published"
    shutil.copytree(run_copy / "exports" / "adapter", target)
    (target / "my-notes.txt").write_text("my notes\n")
    before = snapshot(target)
    assert_user_error(invoke("export", run_copy, "-e", "adapter", "-o", target, "--force"), "my-notes.txt")
    assert snapshot(target) == before


@pytest.mark.slow
def test_export_force_replaces_an_earlier_export(run_copy, tmp_path):
    target = tmp_path / "published"
    shutil.copytree(run_copy / "exports" / "adapter", target)
    result = invoke("export", run_copy, "-e", "adapter", "-o", target, "--force")
    assert result.exit_code == 0, result.output
    assert (target / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("output", ["parent", "model"])
def test_export_refuses_an_output_that_holds_an_input(output, run_copy, tmp_path):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    target = run_copy.parent if output == "parent" else Path(config["model"]["path"]).parent
    before = snapshot(run_copy)
    assert_user_error(invoke("export", run_copy, "-e", "adapter", "-o", target, "--force"), "--output")
    assert snapshot(run_copy) == before
    assert Path(config["model"]["path"], "config.json").is_file()


@pytest.mark.parametrize("link_at", ["exports", "exports/adapter", "adapter", "report.json"])
def test_export_never_writes_through_a_link_in_the_run_directory(link_at, run_copy, user_dir):
    link = run_copy / link_at
    if link.is_dir():
        shutil.copytree(link, user_dir / "copied")
        shutil.rmtree(link)
    else:
        link.unlink()
    link.symlink_to(user_dir if link_at != "adapter" else user_dir / "copied", target_is_directory=True)
    theirs = snapshot(user_dir)
    line = assert_user_error(invoke("export", run_copy, "-e", "adapter", "--force"), "symbolic link")
    assert str(link) in line
    assert snapshot(user_dir) == theirs


def test_export_output_inside_the_run_must_be_under_exports(run_copy):
    assert_user_error(invoke("export", run_copy, "-e", "adapter", "-o", run_copy / "checkpoints" / "x"), "not under its exports/")


@pytest.mark.slow
def test_export_removes_the_temporaries_of_a_killed_export(run_copy):
    stale = run_copy / "exports" / ".adapter.k1ll3d.tmp"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"\0" * 100)
    result = invoke("export", run_copy, "-e", "adapter", "--force")
    assert result.exit_code == 0, result.output
    assert not stale.exists()


def test_export_puts_back_an_export_that_a_kill_left_aside(run_copy):
    final = run_copy / "exports" / "adapter"
    aside = final.with_name(".adapter.replaced-1-0.tmp")
    final.rename(aside)
    before = snapshot(aside)
    result = invoke("export", run_copy, "-e", "adapter")  # no --force: the restored export is in the way
    assert result.exit_code == 2
    assert snapshot(final) == before and not aside.exists()


# --- --resume of a run directory handed over -----------------------------------------------


@pytest.mark.parametrize("link_at", ["checkpoints", "metrics.jsonl", "exports", "adapter"])
def test_resume_never_writes_through_a_link(link_at, run_copy, user_dir, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", yaml.safe_load((run_copy / "config.yaml").read_text()))
    link = run_copy / link_at
    target = user_dir / "target"
    if link.is_dir():
        shutil.copytree(link, target)
        shutil.rmtree(link)
    else:
        shutil.copy(link, target)
        link.unlink()
    link.symlink_to(target)
    theirs = snapshot(user_dir)
    assert_user_error(invoke("run", config, "--resume", run_copy, "--no-progress", "--set", "train.max_steps=4"), "symbolic link")
    assert snapshot(user_dir) == theirs


def test_output_that_is_a_file_or_under_a_file_is_one_line(config, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_user_error(invoke("run", config, "-o", blocker, "--no-progress"), "not a directory")
    assert_user_error(invoke("run", config, "-o", blocker / "run", "--no-progress"), "Not a directory")
    assert blocker.read_text() == "x"


# --- --resume with damaged checkpoints ------------------------------------------------------


def resume_config(run_dir: Path, tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "resume.yaml", yaml.safe_load((run_dir / "config.yaml").read_text()))


def damage(checkpoint: Path, how: str) -> None:
    state = checkpoint / "trainer_state.json"
    if how == "truncated weights":
        data = (checkpoint / "trainable.safetensors").read_bytes()
        (checkpoint / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "missing optimizer file":
        (checkpoint / "optimizer.safetensors").unlink()
    elif how == "partial trainer_state":
        state.write_text(state.read_text()[:100])
    elif how == "step is text":
        state.write_text(json.dumps({**json.loads(state.read_text()), "step": "three"}))
    elif how == "step of another checkpoint":
        state.write_text(json.dumps({**json.loads(state.read_text()), "step": 99}))
    elif how == "no optimizer state":
        data = json.loads(state.read_text())
        data.pop("optimizer")
        state.write_text(json.dumps(data))
    elif how == "optimizer state names missing tensors":
        data = json.loads(state.read_text())
        data["optimizer"]["state"]["0"] = {"dict": {"exp_avg": {"tensor": "nope", "device": "cpu"}}}
        state.write_text(json.dumps(data))
    elif how == "NaN weights":
        import torch
        from safetensors.torch import load_file, save_file

        weights = load_file(str(checkpoint / "trainable.safetensors"))
        name = sorted(weights)[0]
        weights[name] = torch.full_like(weights[name], float("nan"))
        save_file(weights, str(checkpoint / "trainable.safetensors"))
    else:  # pragma: no cover
        raise AssertionError(how)


DAMAGES = [
    "truncated weights",
    "missing optimizer file",
    "partial trainer_state",
    "step is text",
    "step of another checkpoint",
    "no optimizer state",
    "optimizer state names missing tensors",
    "NaN weights",
]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.slow
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(how, run_copy, tmp_path):
    damage(run_copy / "checkpoints" / "step-00000003", how)
    result = invoke("run", resume_config(run_copy, tmp_path), "--resume", run_copy, "--no-progress", "--set", "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert "Skipping checkpoint step-00000003" in result.stderr
    assert "Traceback" not in result.output
    report = json.loads((run_copy / "report.json").read_text())
    assert report["training"]["resumed_from_step"] == 2
    from qlora_plugins.core.rundir import read_metrics

    assert [r["step"] for r in read_metrics(run_copy / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_resume_with_no_intact_checkpoint_is_one_line(run_copy, tmp_path):
    for checkpoint in (run_copy / "checkpoints").iterdir():
        damage(checkpoint, "partial trainer_state")
    before = snapshot(run_copy / "checkpoints")
    result = invoke("run", resume_config(run_copy, tmp_path), "--resume", run_copy, "--no-progress", "--set", "train.max_steps=4")
    assert_user_error(result, "none of the 3 checkpoint(s)")
    assert snapshot(run_copy / "checkpoints") == before


def test_resume_refuses_a_directory_whose_run_json_is_not_ours(run_copy, tmp_path):
    (run_copy / "run.json").write_text('{"name": "web app"}')
    before = snapshot(run_copy)
    assert_user_error(
        invoke("run", resume_config(run_copy, tmp_path), "--resume", run_copy, "--no-progress"), "not written by qlora-plugins"
    )
    assert snapshot(run_copy) == before
