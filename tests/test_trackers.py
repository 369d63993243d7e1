"""Trackers as a plugin kind: the `track` section, the builtin jsonl (metrics.jsonl, byte for byte
what the run wrote before), tensorboard, mlflow and wandb read back with their own readers, a
tracker that fails (reported once, disabled, the run goes on), and the example third-party
package examples/plugins/qlora-tracker-example installed with pip and found by its entry point."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_user_error, base_config, install_example, invoke, read_jsonl

from qlora_plugins import Tracker, TrackerContext, hookimpl
from qlora_plugins.testing import make_registry, run_cli
from qlora_plugins.tracking import dumps, is_metrics_process, read_metrics

PACKAGE = REPO / "examples" / "plugins" / "qlora-tracker-example"
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config_file(tmp_path: Path, **sections) -> Path:
    sections.setdefault("train", {"max_steps": STEPS, "batch_size": 4, "seed": 0, "eval_every": 2, "threads": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(**sections)), encoding="utf-8")
    return path


# --- the section --------------------------------------------------------------------------------


def test_the_default_is_jsonl_and_it_always_runs(registry):
    from qlora_plugins.core.config import parse_config, resolve_plugins

    def names(track):
        data = base_config() if track == "omitted" else base_config(track=track)
        return [t.name for t in resolve_plugins(parse_config(data), registry).trackers]

    assert names("omitted") == ["jsonl"]
    assert names([]) == names(None) == ["jsonl"]
    assert names(["tensorboard"]) == ["jsonl", "tensorboard"]
    assert names("mlflow") == ["jsonl", "mlflow"]
    assert names([{"name": "wandb", "project": "p"}, "jsonl"]) == ["wandb", "jsonl"]


@pytest.mark.parametrize(
    "track, fragments",
    [
        (5, ("track", "must be a list of trackers")),
        (["tensorbord"], ("track[0]", "tensorboard")),
        (["mlflow", "mlflow"], ("track[1].name", "duplicate tracker 'mlflow'")),
        ([{"name": "tensorboard", "flush_secs": 0}], ("track[0].flush_secs",)),
        ([{"name": "wandb", "mode": "cloud"}], ("track[0].mode",)),
        ([None], ("track[0]", "must name a tracker")),
    ],
)
def test_bad_track_sections(track, fragments, tmp_path):
    path = config_file(tmp_path, track=track)
    assert_user_error(invoke("validate", path), *fragments)
    assert_user_error(invoke("run", path, "-o", tmp_path / "out"), *fragments)
    assert not (tmp_path / "out").exists()


def test_plugins_lists_the_kind():
    rows = json.loads(invoke("plugins", "--kind", "tracker", "--json").stdout)["plugins"]
    assert {r["name"] for r in rows} >= {"jsonl", "tensorboard", "mlflow", "wandb"}


def test_jsonl_truncates_on_resume(tmp_path):
    """The jsonl tracker opened for a resumed run keeps the records up to the resumed step."""
    registry = make_registry()
    tracker = registry.create("tracker", "jsonl", {}, "track[0]")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo', encoding="utf-8")
    tracker.open(TrackerContext(tmp_path, tmp_path / "tracking" / "jsonl", {}, resumed_step=3))
    tracker.log({"step": 4, "loss": 0.5})
    tracker.close("completed")
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert not (tmp_path / "tracking").exists()


def test_metrics_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_metrics_process()
    monkeypatch.setenv("RANK", "0")
    assert is_metrics_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_metrics_process()


# --- failing trackers ----------------------------------------------------------------------------


class Recording(Tracker):
    """Records what it is handed."""

    name = "recording"
    seen: list = []

    def open(self, context):
        type(self).seen.append(("open", context.resumed_step, context.directory.name, context.config["model"]["path"] is not None))

    def log(self, record):
        type(self).seen.append(("log", record["step"], sorted(record)))

    def close(self, status):
        type(self).seen.append(("close", status))


class FailsInLog(Tracker):
    name = "fails-in-log"
    calls = 0

    def log(self, record):
        type(self).calls += 1
        raise RuntimeError("the tracking server went away")


class FailsInOpen(Tracker):
    name = "fails-in-open"

    def open(self, context):
        import qlora_no_such_client  # noqa: F401

    def log(self, record):
        raise AssertionError("never called: disabled at open")


class FailsInClose(Tracker):
    name = "fails-in-close"

    def log(self, record):
        pass

    def close(self, status):
        raise OSError(28, "No space left on device")


class TrackersPlugin:
    @hookimpl
    def register_trackers(self, register):
        for cls in (Recording, FailsInLog, FailsInOpen, FailsInClose):
            register(cls)


@pytest.mark.slow
def test_failing_trackers_are_reported_once_and_the_run_goes_on(tmp_path):
    Recording.seen, FailsInLog.calls = [], 0
    path = config_file(tmp_path, track=["fails-in-log", "fails-in-open", "recording", "fails-in-close"])
    out = tmp_path / "run"
    result = run_cli("run", str(path), "-o", str(out), "--no-progress", registry=make_registry([TrackersPlugin()]))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning: tracker")]
    assert len(warnings) == 3, warnings
    assert any("'fails-in-log'" in w and "failed in log" in w and "the tracking server went away" in w for w in warnings)
    assert any("'fails-in-open'" in w and "failed in open" in w and "ModuleNotFoundError" in w for w in warnings)
    assert any("'fails-in-close'" in w and "failed in close" in w and "No space left" in w for w in warnings)
    assert FailsInLog.calls == 1
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and sum("Warning: tracker" in n for n in report["notes"]) == 3
    assert [t["name"] for t in report["plugins"]["trackers"]][:2] == ["jsonl", "fails-in-log"]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # the healthy tracker got every record, in order, then the close
    logged = [s for s in Recording.seen if s[0] == "log"]
    assert Recording.seen[0] == ("open", None, "recording", True) and Recording.seen[-1] == ("close", "completed")
    assert [s[1] for s in logged] == [r["step"] for r in records]
    assert yaml.safe_load((out / "config.yaml").read_text())["track"][0] == {"name": "jsonl"}


# --- the builtin trackers, read back --------------------------------------------------------------


@pytest.mark.slow
def test_builtin_trackers_read_back(tmp_path, monkeypatch):
    """One run with every builtin tracker whose library is installed; each one's files are read
    back with that library's own reader and hold the metrics.jsonl figures."""
    available = [name for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")) if _has(module)]
    if not available:
        pytest.skip("none of tensorboard, mlflow, wandb is installed (pip install 'qlora-plugins[tensorboard,mlflow,wandb]')")
    sent: list = []
    if "wandb" in available:
        import wandb.sdk.wandb_run as wandb_run

        real_log = wandb_run.Run.log

        def log(self, data, step=None, **kwargs):
            sent.append((step, dict(data)))
            return real_log(self, data, step=step, **kwargs)

        monkeypatch.setattr(wandb_run.Run, "log", log)
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    path = config_file(tmp_path, track=available)
    hooks = (sys.exit, sys.excepthook)
    result = invoke("run", path, "-o", out, "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Warning: tracker" not in result.output
    # no tracker leaves the process patched (wandb.init replaces sys.exit and sys.excepthook)
    assert (sys.exit, sys.excepthook) == hooks
    records = read_jsonl(out / "metrics.jsonl")
    # metrics.jsonl is what the run wrote before trackers were plugins: one dumps() a line
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert text == "".join(dumps(r) + "\n" for r in records)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]

    if "tensorboard" in available:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tracking" / "tensorboard"))
        acc.Reload()
        assert {"loss", "lr", "eval_loss", "grad_norm"} <= set(acc.Tags()["scalars"])
        loss = acc.Scalars("loss")
        assert [e.step for e in loss] == [1, 2, 3]
        assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
        assert [e.step for e in acc.Scalars("eval_loss")] == [2, 3]
    if "mlflow" in available:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(out / "tracking" / "mlflow").as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("qlora").experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_name == "run"
        assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["quantizer.name"] == "nf4"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    if "wandb" in available:
        runs = list((out / "tracking" / "wandb" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
        assert [step for step, _ in sent] == [r["step"] for r in records]
        assert sent[0][1]["loss"] == pytest.approx(train[0]["loss"]) and "step" not in sent[0][1]
    links = [p for p in out.rglob("*") if p.is_symlink()]
    assert not links, links  # --resume and qlora export refuse a run directory holding a link
    # a run holding tracking/ is still one that --force may replace
    from qlora_plugins.core.safety import not_a_run_because

    assert not_a_run_because(out) is None


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# --- a third-party tracker, installed -------------------------------------------------------------


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    return install_example(PACKAGE, tmp_path_factory.mktemp("tracker-example"))


@pytest.mark.slow
def test_third_party_tracker_from_its_entry_point(example_site, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.delenv("QLORA_PLUGINS_DISABLE_AUTOLOAD", raising=False)
    importlib.invalidate_caches()
    try:
        rows = {r["name"]: r for r in json.loads(invoke("plugins", "--kind", "tracker", "--json").stdout)["plugins"]}
        assert rows["csv"]["distribution"] == "qlora-tracker-example" and rows["csv"]["version"] == "0.1.0"
        out = tmp_path / "run"
        path = config_file(tmp_path, track=[{"name": "csv", "columns": ["step", "loss", "eval_loss"]}])
        result = invoke("run", path, "-o", out, "--no-progress")
        assert result.exit_code == 0, (result.output, result.exception)
        lines = (out / "tracking" / "csv" / "metrics.csv").read_text().splitlines()
        records = read_jsonl(out / "metrics.jsonl")
        assert lines[0] == "step,loss,eval_loss" and len(lines) == 1 + len(records)
        assert lines[1].startswith("1,") and lines[1].endswith(",")
        report = json.loads((out / "report.json").read_text())
        assert {"name": "csv", "distribution": "qlora-tracker-example"}.items() <= report["plugins"]["trackers"][1].items()
    finally:
        sys.modules.pop("qlora_tracker_example", None)
