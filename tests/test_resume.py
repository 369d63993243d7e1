"""Checkpoint and resume: a real training subprocess killed with SIGKILL at random steps (several
times) and resumed ends with exactly the adapter of an uninterrupted run, and metrics.jsonl has
every step once. Also: result-changing config edits are refused on resume, harmless ones allowed;
a NaN loss stops with a clear error and keeps the last checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAX_STEPS = 10


def write_config(tmp_path: Path, model_dir: Path, **train) -> Path:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        rows = [
            {"instruction": "Repeat the word.", "input": w, "output": w} for w in ["apple", "river", "stone", "cloud", "lamp", "tiger"] * 4
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"path": str(model_dir)},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", "r": 4, "dropout": 0.1},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "data": {"name": "instruction", "path": str(data), "max_length": 96},
        "train": {
            "max_steps": MAX_STEPS,
            "batch_size": 4,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            "eval_every": 4,
            "seed": 3,
            **train,
        },
    }
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(json.dumps(config))
    return path


def qlora_process(*args: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "QLORA_PLUGINS_HOME": str(home), "QLORA_PLUGINS_DISABLE_AUTOLOAD": "1"}
    code = "from qlora_plugins.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            out.append(record["step"])
    return out


def kill_at_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()}")
        if steps_logged(run_dir) and max(steps_logged(run_dir)) >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for training progress")


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_result(tiny_llama_dir, qlora_home, tmp_path):
    import torch

    config = write_config(tmp_path, tiny_llama_dir)
    reference = tmp_path / "reference"
    proc = qlora_process("run", str(config), "-o", str(reference), home=qlora_home)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    kill_steps = sorted(rng.sample(range(2, MAX_STEPS - 1), 2))
    proc = qlora_process("run", str(config), "-o", str(run_dir), home=qlora_home)
    kill_at_step(proc, run_dir, kill_steps[0])
    proc = qlora_process("run", str(config), "--resume", str(run_dir), home=qlora_home)
    kill_at_step(proc, run_dir, kill_steps[1])
    proc = qlora_process("run", str(config), "--resume", str(run_dir), home=qlora_home)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    assert steps_logged(run_dir) == list(range(1, MAX_STEPS + 1))
    ref, got = adapter(reference), adapter(run_dir)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key} differs after kill/resume at steps {kill_steps}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["resumed_from_step"] >= kill_steps[1] - 1
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # keep_checkpoints


@pytest.mark.slow
def test_resume_refuses_result_changing_edits_and_allows_more_steps(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    runner = CliRunner()
    config = write_config(tmp_path, tiny_llama_dir, max_steps=3)
    run_dir = tmp_path / "run"
    first = runner.invoke(cli, ["run", str(config), "-o", str(run_dir), "--no-progress"], obj={})
    assert first.exit_code == 0, first.output
    changed = runner.invoke(cli, ["run", str(config), "--resume", str(run_dir), "--set", "adapter.r=8", "--no-progress"], obj={})
    assert changed.exit_code == 2
    assert "adapter.r: 4 -> 8" in changed.output and "Traceback" not in changed.output
    other_quant = runner.invoke(cli, ["run", str(config), "--resume", str(run_dir), "--set", "quantizer.name=fp4", "--no-progress"], obj={})
    assert other_quant.exit_code == 2 and "quantizer.name" in other_quant.output
    more = runner.invoke(cli, ["run", str(config), "--resume", str(run_dir), "--set", "train.max_steps=5", "--no-progress"], obj={})
    assert more.exit_code == 0, more.output
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5]
    not_a_run = runner.invoke(cli, ["run", str(config), "--resume", str(tmp_path), "--no-progress"], obj={})
    assert not_a_run.exit_code == 2 and "not a qlora run directory" in not_a_run.output


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    config = write_config(tmp_path, tiny_llama_dir, max_steps=6)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        ["run", str(config), "-o", str(run_dir), "--set", "optimizer.lr=1e30", "--set", "train.max_grad_norm=null", "--no-progress"],
        obj={},
    )
    assert result.exit_code == 2, result.output
    assert "at step" in result.output and "Traceback" not in result.output
    from qlora_plugins.core.checkpointing import latest_checkpoint

    assert latest_checkpoint(run_dir) is not None
    assert json.loads((run_dir / "run.json").read_text())["status"].startswith("failed")


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A SIGKILL in the middle of deleting an old checkpoint used to leave a ``step-*`` directory
    without its trainer_state.json, which no later prune recognised (a run ended with 3
    checkpoints where keep_checkpoints is 2). Old checkpoints are renamed to a temporary first;
    the next prune removes temporaries a kill left behind, half-written ones too."""
    import shutil

    from qlora_plugins.core import checkpointing

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "trainer_state.json").write_text("{}")
        (root / f"step-{step:08d}" / "adapter.safetensors").write_bytes(b"x" * 10)
    (root / ".step-00000004.abcd.tmp").mkdir()  # a save that a kill interrupted
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        if ".pruned" in str(path):
            (Path(path) / "trainer_state.json").unlink()  # deletion had begun ...
            raise KeyboardInterrupt  # ... when the process stopped
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000002", "step-00000003"]
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    checkpointing.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
