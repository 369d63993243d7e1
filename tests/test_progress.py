"""One progress mechanism for every long stage (core/progress.py): bars on a terminal, one line
per stage otherwise, nothing with --json; deep code reports through ``advance`` without a
progress object being passed down."""

from __future__ import annotations

from conftest import base_config, invoke


def test_every_long_stage_reports_one_line_when_stderr_is_not_a_terminal(write_config, tmp_path):
    result = invoke("run", write_config(base_config()), "-o", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    for stage in ("data: done", "load: done", "train: done", "eval: done", "export adapter: done", "fidelity adapter: done"):
        assert any(line.startswith(stage) for line in lines), (stage, result.stderr)
    load = next(line for line in lines if line.startswith("load: done"))
    assert " KB" in load or " MB" in load  # the bytes read while loading and quantizing


def test_export_reports_its_stages(write_config, tmp_path):
    out = tmp_path / "run"
    assert invoke("run", write_config(base_config()), "-o", out, "--no-progress").exit_code == 0
    result = invoke("export", out, "-e", "merged")
    assert result.exit_code == 0, result.output
    assert any(line.startswith("export merged: done") for line in result.stderr.splitlines())
    assert any(line.startswith("fidelity merged: done") for line in result.stderr.splitlines())


def test_json_output_shows_no_progress(write_config, tmp_path):
    result = invoke("run", write_config(base_config()), "-o", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    assert "done (" not in result.stderr


def test_stages_count_what_deep_code_advances_and_are_silent_outside_a_command():
    from qlora_plugins.core.progress import Progress, advance, current, use

    lines: list[str] = []
    advance(5)  # no stage open: nothing happens
    with current().stage("silent"):
        advance(1)
    with use(Progress(bars=False, log=lines.append)):
        with current().stage("outer", unit="B") as outer:
            with current().stage("inner", unit="item") as inner:
                advance(3)
            advance(2048)
    assert inner.done == 3 and outer.done == 2048
    assert lines[0].startswith("inner: done (3 item") and lines[1].startswith("outer: done (2.0 KB")
