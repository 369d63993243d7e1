"""Faults during a run: a third-party plugin that raises (at import, in its hook, while
quantizing, while exporting), a disk that fills during a checkpoint or an export, and Ctrl-C.

Each must end with one clear `Error:` line (exit code 2; 130 for Ctrl-C) that names the culprit,
leave the run directory consistent (run.json not "completed", no half-written export, adapter or
checkpoint, no temporaries) and lose nothing already saved (earlier checkpoints byte-for-byte
intact, and `--resume` finishes the run from them).

The full disk is a real 4 MiB tmpfs when the tests may mount one (root); elsewhere the safetensors
writers are patched to write half a file and fail the way they do on a full disk
(``SafetensorError: ... No space left on device (os error 28)``). The disk is filled at a chosen
moment (before the third checkpoint, before the adapter is saved, before the exporters run)
through a wrapper around the pipeline function that starts that moment.

Tests marked ``xfail(strict=True)`` pin bugs in files this suite does not own; each reason names
the file and the failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from conftest import base_config, invoke, new_registry

# --- helpers -------------------------------------------------------------------------------

FAULTY_DIST = "qlora-faulty"

FAULTY_MODULE = '''
"""A third-party plugin package that fails in the way MODE says."""
from qlora_plugins import Exporter, Quantizer, hookimpl

MODE = {mode!r}

if MODE == "import":
    raise RuntimeError("faulty plugin cannot find libfaulty.so")


class FaultyQuantizer(Quantizer):
    """Loads full precision, then fails while quantizing."""

    name = "faulty"

    def quantize_model(self, model, skip_modules):
        if MODE == "quantize-runtime":
            raise RuntimeError("scale table overflow in layer q_proj")
        raise ZeroDivisionError("blocks of size 0 in layer q_proj")


class FaultyExporter(Exporter):
    """Writes part of an artifact, then fails."""

    name = "faulty_export"

    def export(self, context, output_dir):
        (output_dir / "part-1.safetensors").write_bytes(b"half of an artifact")
        raise RuntimeError("lost the connection to the artifact store")


@hookimpl
def register_quantizers(register):
    if MODE == "hook":
        raise RuntimeError("faulty hook exploded")
    register(FaultyQuantizer)


@hookimpl
def register_exporters(register):
    register(FaultyExporter)
'''


def install_faulty(fake_distribution: Callable, mode: str) -> None:
    """Install the faulty plugin as distribution ``qlora-faulty`` 1.2.3, entry point ``faulty``."""
    module = f"qlora_faulty_{mode.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    fake_distribution(FAULTY_DIST, {"faulty": module}, {module: FAULTY_MODULE.format(mode=mode)})


def faulty_module(mode: str) -> types.ModuleType:
    """The faulty plugin as an in-process module (for ``create_registry(plugins=[...])``)."""
    module = types.ModuleType(f"qlora_faulty_{mode}")
    module.__distribution__ = FAULTY_DIST
    exec(FAULTY_MODULE.format(mode=mode), module.__dict__)
    return module


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def error_line(result: Any) -> str:
    """Exit code 2, exactly one `Error:` line (the last line of stderr), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def run_status(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["status"]


def temporaries(root: Path) -> list[str]:
    """Temporary files and directories (``.name.*.tmp``, ``.name.old-*``) left under ``root``."""
    return [str(p) for p in root.rglob(".*") if p.name.endswith(".tmp") or ".old-" in p.name]


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def loss_steps(run_dir: Path) -> list[int]:
    """Steps with a training loss in metrics.jsonl (a line still being written is skipped)."""
    from qlora_plugins.core.rundir import read_metrics

    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def checkpoint_steps(run_dir: Path) -> list[int]:
    from qlora_plugins.core.checkpointing import list_checkpoints

    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]


# --- plugins that raise ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["import", "hook"])
def test_plugin_failing_at_import_or_in_its_hook(mode, fake_distribution, tmp_path):
    """The run stops before writing anything; stderr names the entry point, its distribution and
    the error (a `Warning:` line), then the one `Error:` line."""
    install_faulty(fake_distribution, mode)
    config = write_yaml(tmp_path / "c.yaml", base_config(quantizer={"name": "faulty"}))
    out = tmp_path / "out"
    result = invoke("run", config, "-o", out, "--no-progress")
    line = error_line(result)
    assert "quantizer.name: unknown quantizer 'faulty'" in line
    warnings = [w for w in result.stderr.splitlines() if w.startswith("Warning:") and FAULTY_DIST in w]
    assert len(warnings) == 1, result.stderr
    assert "entry point 'faulty = qlora_faulty_" in warnings[0] and f"distribution '{FAULTY_DIST}' 1.2.3" in warnings[0]
    assert ("libfaulty.so" if mode == "import" else "faulty hook exploded") in warnings[0]
    assert not out.exists()


@pytest.mark.parametrize("mode", ["import", "hook"])
def test_error_line_points_at_the_broken_plugin(mode, fake_distribution, tmp_path):
    install_faulty(fake_distribution, mode)
    config = write_yaml(tmp_path / "c.yaml", base_config(quantizer={"name": "faulty"}))
    line = error_line(invoke("run", config, "-o", tmp_path / "out", "--no-progress"))
    assert FAULTY_DIST in line


@pytest.mark.parametrize(
    "mode",
    [
        "quantize-runtime",
        "quantize-other",
    ],
)
def test_quantizer_raising_while_quantizing(mode, fake_distribution, tmp_path):
    install_faulty(fake_distribution, mode)
    config = write_yaml(tmp_path / "c.yaml", base_config(quantizer={"name": "faulty"}))
    out = tmp_path / "out"
    line = error_line(invoke("run", config, "-o", out, "--no-progress"))
    assert "quantizer 'faulty'" in line and FAULTY_DIST in line and "layer q_proj" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def failed_export(tmp_path_factory):
    """A run whose second exporter (third-party, in-process) writes a file and raises."""
    root = tmp_path_factory.mktemp("failed-export")
    config = write_yaml(root / "c.yaml", base_config(export=[{"name": "adapter"}, {"name": "faulty_export"}]))
    out = root / "run"
    registry = new_registry(plugins=[faulty_module("export")])
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    result = CliRunner().invoke(cli, ["run", str(config), "-o", str(out), "--no-progress"], obj={"registry": registry})
    return result, out


@pytest.mark.slow
def test_exporter_raising_names_it_and_leaves_the_run_consistent(failed_export):
    result, out = failed_export
    line = error_line(result)
    assert "exporter 'faulty_export'" in line and f"distribution '{FAULTY_DIST}'" in line
    assert "RuntimeError: lost the connection to the artifact store" in line
    assert run_status(out) != "completed" and not (out / "report.json").exists()
    assert not (out / "exports" / "faulty_export").exists()  # no half export
    assert temporaries(out) == []
    assert (out / "exports" / "adapter" / "manifest.json").is_file()  # the export before it is complete
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # the trained adapter is kept


@pytest.mark.slow
def test_failed_export_is_recorded_in_run_json(failed_export):
    _, out = failed_export
    assert run_status(out).startswith("failed")


# --- a disk that fills -----------------------------------------------------------------------

TMPFS_SIZE = 4 * 1024 * 1024


class SmallDisk:
    """A directory on a small tmpfs that a test fills at a chosen moment (``fill``); where no
    tmpfs can be mounted, a plain directory where "full" means the safetensors writers (the
    checkpoint's and peft's) write half a file and raise what they raise on a full disk."""

    def __init__(self, root: Path, real: bool) -> None:
        self.root, self.real = root, real
        self.filler = root / "filler.bin"
        self.patches = pytest.MonkeyPatch()

    def fill(self, free: int = 64 * 1024) -> None:
        """Leave about ``free`` bytes: enough for run.json, too little for any tensor file."""
        if not self.real:
            return self._simulate()
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * 65536):
                    pass
        finally:
            os.close(fd)
        os.truncate(self.filler, max(0, self.filler.stat().st_size - free))

    def _simulate(self) -> None:
        import peft.peft_model
        import safetensors.torch
        from safetensors import SafetensorError

        real_save = safetensors.torch.save_file

        def full_disk(tensors: dict, filename: str, *args: Any, **kwargs: Any) -> None:
            real_save(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        self.patches.setattr(safetensors.torch, "save_file", full_disk)
        self.patches.setattr(peft.peft_model, "safe_save_file", full_disk)

    def release(self) -> None:
        """Free the space again."""
        self.filler.unlink(missing_ok=True)
        self.patches.undo()


@contextlib.contextmanager
def small_disk(base: Path) -> Iterator[SmallDisk]:
    mount = base / "disk"
    mount.mkdir()
    mounted = (
        hasattr(os, "geteuid")
        and os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)], capture_output=True).returncode == 0
    )
    disk = SmallDisk(mount, mounted)
    try:
        yield disk
    finally:
        disk.release()
        if mounted:
            subprocess.run(["umount", str(mount)], check=False, capture_output=True)


def disk_config(root: Path, **sections: Any) -> Path:
    train = {"max_steps": 4, "batch_size": 4, "seed": 0, "checkpoint_every": 1, "keep_checkpoints": 2}
    return write_yaml(root / "c.yaml", base_config(train=train, **sections))


@pytest.fixture(scope="module")
def checkpoint_on_full_disk(tmp_path_factory):
    """A run whose disk fills just before the checkpoint of step 3; then the space is freed and
    the run resumed."""
    from qlora_plugins.core import pipeline

    root = tmp_path_factory.mktemp("full-checkpoint")
    config = disk_config(root, export=[])
    facts: dict[str, Any] = {"saved": {}}
    with small_disk(root) as disk, pytest.MonkeyPatch.context() as mp:
        out = disk.root / "run"
        real_save = pipeline.save_training_checkpoint

        def save(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: Any, *args: Any) -> Path:
            if state.step == 3:
                disk.fill()
            path = real_save(run_dir, model, optimizer, scheduler, state, *args)
            facts["saved"][path.name] = digests(path)
            return path

        mp.setattr(pipeline, "save_training_checkpoint", save)
        facts["result"] = invoke("run", config, "-o", out, "--no-progress")
        facts["after"] = {p.name: digests(p) for p in (out / "checkpoints").iterdir()}
        facts["status"] = run_status(out)
        facts["temporaries"] = temporaries(out)
        facts["steps"] = loss_steps(out)
        disk.release()
        mp.undo()
        facts["resumed"] = invoke("run", config, "--resume", out, "--no-progress")
        facts["resumed_steps"] = loss_steps(out)
        facts["report"] = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
        facts["real_disk"] = disk.real
        yield facts


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_loses_nothing(checkpoint_on_full_disk):
    facts = checkpoint_on_full_disk
    assert facts["result"].exit_code != 0
    assert sorted(facts["saved"]) == ["step-00000001", "step-00000002"]
    assert facts["after"] == facts["saved"]  # the earlier checkpoints, byte for byte; no partial step-3
    assert facts["temporaries"] == []
    assert facts["status"].startswith("failed") and "No space left on device" in facts["status"]
    assert facts["steps"] == [1, 2, 3]
    # once there is space again, the run continues from step 2 to the end, without gaps
    assert facts["resumed"].exit_code == 0, facts["resumed"].output
    assert facts["report"]["training"]["resumed_from_step"] == 2
    assert facts["resumed_steps"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_one_clear_line(checkpoint_on_full_disk):
    line = error_line(checkpoint_on_full_disk["result"])
    assert "cannot write checkpoint" in line and "No space left on device" in line


def _export_on_full_disk(where: str, root: Path) -> Iterator[tuple[Any, Path]]:
    """A run whose disk fills after training: before the trained adapter is saved into the run
    directory (``adapter``) or before the exporters run (``exporter``)."""
    from qlora_plugins.core import pipeline

    config = disk_config(root)
    with small_disk(root) as disk, pytest.MonkeyPatch.context() as mp:
        out = disk.root / "run"
        if where == "adapter":
            real_directory = pipeline.atomic_directory

            @contextlib.contextmanager
            def directory(final: Path, force: bool = False) -> Iterator[Path]:
                disk.fill()
                with real_directory(final, force) as tmp:
                    yield tmp

            mp.setattr(pipeline, "atomic_directory", directory)
        else:
            real_exports = pipeline.run_exports

            def exports(*args: Any, **kwargs: Any) -> dict:
                disk.fill()
                return real_exports(*args, **kwargs)

            mp.setattr(pipeline, "run_exports", exports)
        result = invoke("run", config, "-o", out, "--no-progress")
        disk.release()  # the run directory stays for the tests to inspect; the patches must not leak
        mp.undo()
        yield result, out


@pytest.fixture(scope="module")
def adapter_save_on_full_disk(tmp_path_factory):
    yield from _export_on_full_disk("adapter", tmp_path_factory.mktemp("full-adapter"))


@pytest.fixture(scope="module")
def exporter_on_full_disk(tmp_path_factory):
    yield from _export_on_full_disk("exporter", tmp_path_factory.mktemp("full-exporter"))


@pytest.mark.parametrize("where", ["adapter_save", "exporter"])
@pytest.mark.slow
def test_full_disk_after_training_leaves_no_half_artifact(where, request):
    result, out = request.getfixturevalue(f"{where}_on_full_disk")
    assert result.exit_code != 0
    assert run_status(out) != "completed" and not (out / "report.json").exists()
    assert temporaries(out) == []
    assert checkpoint_steps(out) == [3, 4]  # training's checkpoints survive, loadable
    from safetensors.torch import load_file

    for step in ("step-00000003", "step-00000004"):
        assert load_file(str(out / "checkpoints" / step / "trainable.safetensors"))
    if where == "adapter_save":
        assert not (out / "adapter").exists()
    else:  # the adapter saved before the disk filled is complete
        assert load_file(str(out / "adapter" / "adapter_model.safetensors"))
    exports = out / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []


@pytest.mark.slow
def test_full_disk_while_saving_the_adapter_is_one_clear_line(adapter_save_on_full_disk):
    result, _ = adapter_save_on_full_disk
    line = error_line(result)
    assert "adapter" in line and "No space left on device" in line


@pytest.mark.slow
def test_full_disk_during_an_export_is_one_clear_line(exporter_on_full_disk):
    result, _ = exporter_on_full_disk
    line = error_line(result)
    assert "exporter 'adapter'" in line and "No space left on device" in line


# --- Ctrl-C ----------------------------------------------------------------------------------

CTRL_C_STEPS = 16


def qlora_process(args: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "QLORA_PLUGINS_HOME": str(home), "QLORA_PLUGINS_DISABLE_AUTOLOAD": "1"}
    code = "from qlora_plugins.cli import main; main()"
    # SIGINT back to its default in the child: a test run started in the background by a shell
    # without job control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(qlora_home, tmp_path):
    """SIGINT to a real `qlora run` mid-training (no periodic checkpoints): exit code 130, a
    checkpoint of the last completed step, and `--resume` finishes with every step logged once."""
    config = write_yaml(
        tmp_path / "c.yaml",
        base_config(train={"max_steps": CTRL_C_STEPS, "batch_size": 2, "seed": 0, "checkpoint_every": 100_000}, export=[]),
    )
    out = tmp_path / "run"
    proc = qlora_process(["run", str(config), "-o", str(out)], qlora_home)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(loss_steps(out)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before the interrupt: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert run_status(out) == "interrupted"
    (step,) = checkpoint_steps(out)
    assert 2 <= step < CTRL_C_STEPS
    assert loss_steps(out) == list(range(1, step + 1))

    proc = qlora_process(["run", str(config), "--resume", str(out)], qlora_home)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert loss_steps(out) == list(range(1, CTRL_C_STEPS + 1))
    assert run_status(out) == "completed"
    assert json.loads((out / "report.json").read_text())["training"]["resumed_from_step"] == step


@pytest.mark.slow
def test_ctrl_c_during_evaluation_saves_the_completed_steps(tmp_path, monkeypatch):
    from qlora_plugins.core import training
    from qlora_plugins.core.checkpointing import latest_checkpoint

    def interrupted(*args: Any, **kwargs: Any) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "evaluate", interrupted)
    config = write_yaml(tmp_path / "c.yaml", base_config(train={"max_steps": 4, "batch_size": 4, "seed": 0, "eval_every": 2}, export=[]))
    out = tmp_path / "run"
    result = invoke("run", config, "-o", out, "--no-progress")
    assert result.exit_code == 130
    assert latest_checkpoint(out) is not None and latest_checkpoint(out).name == "step-00000002"
