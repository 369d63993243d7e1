"""SIGTERM, failed writes and runs that must stop instead of writing nonsense.

- SIGTERM (what Slurm and Kubernetes send before SIGKILL) behaves like Ctrl-C: a checkpoint of the
  last completed step, ``run.json`` says interrupted, exit code 143, and ``--resume`` finishes.
- Every write (run directory, run.json, config.yaml, report.json, loss.png, the adapter, exports,
  the model cache) that fails with an OSError is one line naming the path, exit code 2, and leaves
  a directory that ``--force`` or ``--resume`` can handle.
- Every JSON file the tool writes is strict JSON; a non-finite evaluation loss stops the run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_user_error, base_config, invoke


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def strict_load(text: str):
    """json.loads that refuses NaN and Infinity (what JavaScript, jq and Go refuse)."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def steps_logged(run_dir: Path) -> list[int]:
    from qlora_plugins.core.rundir import read_metrics

    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def checkpoints(run_dir: Path) -> list[int]:
    from qlora_plugins.core.checkpointing import list_checkpoints

    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob(".*") if p.name.endswith(".tmp"))


# --- SIGTERM ---------------------------------------------------------------------------------

SLOW_EXPORTER = '''
import os
import time
from pathlib import Path

from qlora_plugins import Exporter, hookimpl


class SlowExporter(Exporter):
    """Writes half an export, says so, then takes its time."""

    name = "slow"

    def export(self, context, output_dir):
        (output_dir / "part.safetensors").write_bytes(b"half")
        Path(os.environ["SLOW_EXPORT_STARTED"]).write_text("started")
        time.sleep(120)
        return {}


@hookimpl
def register_exporters(register):
    register(SlowExporter)
'''


def qlora(args: list[str], home: Path, site: Path | None = None, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "QLORA_PLUGINS_HOME": str(home), "QLORA_PLUGINS_DISABLE_AUTOLOAD": "1", **env}
    if site is not None:
        environment.pop("QLORA_PLUGINS_DISABLE_AUTOLOAD")
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environment.get("PYTHONPATH")]))
    code = "from qlora_plugins.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "--no-progress"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"the condition never held while the process ran: {proc.communicate()}")


@pytest.mark.slow
def test_sigterm_mid_training_checkpoints_the_last_step_and_resume_finishes(qlora_home, tmp_path):
    total = 40
    config = write_yaml(
        tmp_path / "c.yaml",
        base_config(train={"max_steps": total, "batch_size": 2, "seed": 0, "checkpoint_every": 1000, "threads": 1}, export=[]),
    )
    out = tmp_path / "run"
    proc = qlora(["run", str(config), "-o", str(out)], qlora_home)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(steps_logged(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "--resume" in stderr and "SIGTERM" in stderr
    marker = status(out)
    assert marker["status"] == "interrupted" and marker["signal"] == "SIGTERM"
    (step,) = checkpoints(out)
    assert 3 <= step < total and steps_logged(out) == list(range(1, step + 1))
    assert leftovers(out) == []

    proc = qlora(["run", str(config), "--resume", str(out)], qlora_home)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert steps_logged(out) == list(range(1, total + 1))
    assert status(out)["status"] == "completed"


@pytest.fixture
def slow_exporter_site(tmp_path) -> Path:
    """A site directory holding an installed distribution with the slow exporter."""
    site = tmp_path / "site"
    info = site / "slow_export-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slow-export\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qlora_plugins]\nslow = slow_export_plugin\n")
    (site / "slow_export_plugin.py").write_text(textwrap.dedent(SLOW_EXPORTER))
    return site


@pytest.mark.slow
def test_sigterm_during_an_export_leaves_no_temporary_and_resume_does_not_train_again(qlora_home, tmp_path, slow_exporter_site):
    config = write_yaml(tmp_path / "c.yaml", base_config(export=[{"name": "adapter"}, {"name": "slow"}]))
    out = tmp_path / "run"
    started = tmp_path / "started"
    proc = qlora(["run", str(config), "-o", str(out)], qlora_home, slow_exporter_site, SLOW_EXPORT_STARTED=str(started))
    wait_for(started.exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert status(out)["status"] == "interrupted"
    assert leftovers(out) == []  # the half-written export's temporary directory is gone
    assert (out / "exports" / "adapter" / "manifest.json").is_file() and not (out / "exports" / "slow").exists()
    assert checkpoints(out) == [3]  # the finished training is kept: --resume goes straight to the exports

    resumed = invoke("run", write_yaml(tmp_path / "c2.yaml", base_config()), "--resume", out, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "report.json").read_text())["training"]["resumed_from_step"] == 3
    assert steps_logged(out) == [1, 2, 3]


# --- writes that fail ------------------------------------------------------------------------


class FailingReplace:
    """``os.replace`` that fails with ENOSPC the first time its destination is named ``name``."""

    def __init__(self, name: str) -> None:
        self.name, self.real, self.fired = name, os.replace, False

    def __call__(self, src, dst, *args, **kwargs):
        if not self.fired and Path(dst).name == self.name:
            self.fired = True
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return self.real(src, dst, *args, **kwargs)


@pytest.mark.parametrize("name", ["run.json", "config.yaml", "adapter", "report.json", "loss.png"])
@pytest.mark.slow
def test_a_failed_write_is_one_line_and_the_run_can_be_done_again(name, tmp_path, monkeypatch):
    config = write_yaml(tmp_path / "c.yaml", base_config())
    out = tmp_path / "run"
    failing = FailingReplace(name)
    monkeypatch.setattr(os, "replace", failing)
    line = assert_user_error(invoke("run", config, "-o", out, "--no-progress"), "No space left on device")
    assert failing.fired and name in line
    monkeypatch.undo()
    if (out / "run.json").is_file():
        assert status(out)["status"].startswith("failed")
    assert leftovers(tmp_path) == []
    again = invoke("run", config, "-o", out, "--force", "--no-progress")
    assert again.exit_code == 0, again.output
    assert status(out)["status"] == "completed"


@pytest.mark.slow
def test_a_failed_write_over_a_previous_run_puts_it_back(tmp_path, monkeypatch):
    config = write_yaml(tmp_path / "c.yaml", base_config())
    out = tmp_path / "run"
    assert invoke("run", config, "-o", out, "--no-progress").exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(os, "replace", FailingReplace("report.json"))
    assert_user_error(invoke("run", config, "-o", out, "--force", "--no-progress", "--set", "train.seed=3"), "report.json")
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A read-only tmpfs (root may write anywhere else, so permissions alone prove nothing)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        pytest.skip("mounting a read-only tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False, capture_output=True)


def test_an_output_on_a_read_only_file_system_is_one_line(read_only_dir, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", base_config())
    assert_user_error(invoke("run", config, "-o", read_only_dir / "run", "--no-progress"), "--output", "Read-only file system")


def test_a_model_cache_on_a_read_only_file_system_is_one_line(read_only_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_PLUGINS_HOME", str(read_only_dir / "home"))
    config = write_yaml(tmp_path / "c.yaml", base_config())
    assert_user_error(invoke("run", config, "-o", tmp_path / "run", "--no-progress"), "model.source", "model cache", "QLORA_PLUGINS_HOME")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_export_to_a_read_only_file_system_is_one_line(read_only_dir, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", base_config())
    out = tmp_path / "run"
    assert invoke("run", config, "-o", out, "--no-progress").exit_code == 0
    assert_user_error(invoke("export", out, "-e", "adapter", "-o", read_only_dir / "x"), "Read-only file system")


@pytest.mark.slow
def test_metrics_jsonl_that_is_a_directory_is_one_line(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", base_config(train={"max_steps": 2, "batch_size": 4, "seed": 0, "checkpoint_every": 1}))
    out = tmp_path / "run"
    assert invoke("run", config, "-o", out, "--no-progress").exit_code == 0
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    line = assert_user_error(invoke("run", config, "--resume", out, "--no-progress", "--set", "train.max_steps=3"), "metrics.jsonl")
    assert "cannot write" in line


# --- strict JSON, non-finite losses, reserved keys ----------------------------------------------


def test_a_non_finite_eval_loss_stops_the_run_and_every_json_file_is_strict(tmp_path):
    config = write_yaml(
        tmp_path / "c.yaml",
        base_config(
            optimizer={"name": "adamw", "lr": 1e30}, export=[{"name": "adapter"}], train={"max_steps": 1, "batch_size": 4, "seed": 0}
        ),
    )
    out = tmp_path / "run"
    line = assert_user_error(invoke("run", config, "-o", out, "--no-progress"), "eval loss became")
    assert "tolerance" not in line
    assert status(out)["status"].startswith("failed: eval loss became")
    for path in out.rglob("*.json*"):
        for text in [path.read_text()] if path.suffix == ".json" else path.read_text().splitlines():
            strict_load(text)
    assert not (out / "exports").exists()


@pytest.mark.slow
def test_the_json_report_printed_is_strict(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", base_config())
    result = invoke("run", config, "-o", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    report = strict_load(result.stdout)
    assert report["status"] == "completed"
    from qlora_plugins.core.rundir import dumps

    assert strict_load(dumps({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}


FACT_EXPORTER = '''
from qlora_plugins import Exporter, hookimpl
from safetensors.torch import save_file
import torch


class Facts(Exporter):
    """Returns facts that collide with the host's own keys."""

    name = "facts"

    def export(self, context, output_dir):
        save_file({"x": torch.zeros(1)}, str(output_dir / "x.safetensors"))
        return {"files": 5, "path": "/elsewhere", "fidelity": "perfect", "format": "custom"}

    def reload(self, directory, context):
        return context.model


@hookimpl
def register_exporters(register):
    register(Facts)
'''


@pytest.mark.slow
def test_an_exporters_facts_never_overwrite_the_hosts_keys(fake_distribution, tmp_path):
    fake_distribution("facts-export", {"facts": "facts_export_plugin"}, {"facts_export_plugin": FACT_EXPORTER})
    config = write_yaml(tmp_path / "c.yaml", base_config(export=[{"name": "facts"}]))
    out = tmp_path / "run"
    result = invoke("run", config, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    facts = json.loads((out / "report.json").read_text())["exports"]["facts"]
    assert facts["path"] == str(out / "exports" / "facts") and facts["files"] == ["x.safetensors"]
    assert isinstance(facts["fidelity"], dict) and facts["format"] == "custom"
    exported = invoke("export", out, "-e", "facts", "--force", "--json")
    assert exported.exit_code == 0, exported.output
    assert strict_load(exported.stdout)["facts"]["files"] == ["x.safetensors"]
