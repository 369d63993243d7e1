"""Mixing several data files (``data.sources``): concatenated without weights, sampled by
weight with the run's seed; each source's share of the training examples and tokens in
report.json and the summary; every source's file an input for ``--force``; bad combinations
refused before anything loads, in one line naming the option."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from qlora_plugins.api import load_config, resolve_plugins, resolved_dict
from qlora_plugins.data import mixed_counts, sample_indices
from qlora_plugins.testing import make_registry, run_cli


def write_rows(path: Path, n: int, output: str, columns: tuple[str, str] = ("instruction", "output")) -> Path:
    rows = [{columns[0]: f"Say {output} {i}.", columns[1]: f"{output} {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(tmp_path: Path, data: dict, name: str = "config.yaml", **train) -> Path:
    config = {
        "model": {"source": "tiny-llama"},
        "adapter": {"name": "lora", "r": 4},
        "optimizer": {"name": "adamw"},
        "data": {"name": "instruction", "max_length": 64, "eval_fraction": 0.0, **data},
        "train": {"max_steps": 1, "batch_size": 4, "seed": 0, "threads": 1, **train},
        "export": [],
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    a = write_rows(tmp_path / "a.jsonl", 12, "alpha")
    b = write_rows(tmp_path / "b.jsonl", 4, "beta", ("question", "answer"))
    return a, b


def run(config: Path, out: Path, summary: list | None = None) -> dict:
    result = run_cli("run", config, "--output", out, "--no-progress", registry=make_registry())
    assert result.exit_code == 0, result.output
    if summary is not None:
        summary.append(result.stdout)
    return json.loads((out / "report.json").read_text())


# --- the arithmetic of weights -------------------------------------------------------------


def test_weighted_counts_add_up_and_follow_the_weights():
    assert mixed_counts([12, 4], [1, 1]) == [8, 8]
    assert mixed_counts([12, 4], [3, 1]) == [12, 4]
    assert mixed_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    counts = mixed_counts([7, 5, 3], [0.5, 0.3, 0.2])
    assert sum(counts) == 15 and counts == [8, 4, 3]  # 7.5, 4.5, 3.0: the tie goes to the first


def test_sampling_repeats_or_subsamples_deterministically():
    up = sample_indices(4, 10, seed=0, source=1)
    assert len(up) == 10 and all(up.count(i) in (2, 3) for i in range(4))
    down = sample_indices(12, 5, seed=0, source=0)
    assert len(set(down)) == 5 and all(0 <= i < 12 for i in down)
    assert down == sample_indices(12, 5, seed=0, source=0) and down != sample_indices(12, 5, seed=1, source=0)


# --- runs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_concatenated_and_weighted_sources_report_their_shares_in_report_and_summary(tmp_path, files):
    a, b = files
    plain = write_config(
        tmp_path, {"sources": [{"path": a.name}, {"path": b.name, "instruction_column": "question", "output_column": "answer"}]}
    )
    summary: list = []
    report = run(plain, tmp_path / "plain", summary)
    assert "source a.jsonl" in summary[0] and "12 examples (75.0%)" in summary[0]
    assert "source b.jsonl" in summary[0] and "4 examples (25.0%)" in summary[0]
    sources = report["data"]["sources"]
    assert [s["train_examples"] for s in sources] == [12, 4] and report["training"]["train_examples"] == 16
    assert [s["example_share"] for s in sources] == [0.75, 0.25]
    assert sum(s["token_share"] for s in sources) == pytest.approx(1.0, abs=1e-3) and all(s["tokens"] > 0 for s in sources)
    assert [s["weight"] for s in sources] == [None, None]

    weighted = write_config(
        tmp_path,
        {
            "sources": [
                {"path": a.name, "weight": 1},
                {"path": b.name, "weight": 1, "instruction_column": "question", "output_column": "answer"},
            ]
        },
        "weighted.yaml",
    )
    report = run(weighted, tmp_path / "weighted")
    sources = report["data"]["sources"]
    assert [s["train_examples"] for s in sources] == [8, 8]  # 16 examples in all, half each
    assert [s["distinct_train_examples"] for s in sources] == [8, 4]  # a subsampled, b repeated twice
    assert [s["example_share"] for s in sources] == [0.5, 0.5]
    # the resolved config keeps every source (absolute paths, the options they change) and re-parses
    resolved = yaml.safe_load((tmp_path / "weighted" / "config.yaml").read_text())
    assert [s["path"] for s in resolved["data"]["sources"]] == [str(a), str(b)]
    assert resolved["data"]["sources"][1]["output_column"] == "answer" and "output_column" not in resolved["data"]["sources"][0]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(resolved), encoding="utf-8")
    config = load_config(again)
    assert resolved_dict(config, resolve_plugins(config, make_registry()))["data"] == resolved["data"]


def test_the_same_seed_mixes_the_same_examples(tmp_path, files):
    from qlora_plugins.api import Pipeline

    a, b = files
    data = {
        "sources": [
            {"path": a.name, "weight": 1},
            {"path": b.name, "weight": 3, "instruction_column": "question", "output_column": "answer"},
        ]
    }

    def train_ids(seed: int, name: str) -> list:
        config = load_config(write_config(tmp_path, data, name, seed=seed))
        pipeline = Pipeline(config, make_registry(), tmp_path / f"out-{name}", progress=False)
        return [tuple(e["input_ids"]) for e in pipeline.prepare(pipeline.check()).splits.train]

    first, again, other = train_ids(0, "s0.yaml"), train_ids(0, "s0b.yaml"), train_ids(7, "s7.yaml")
    assert first == again and first != other and len(first) == 16


# --- inputs and refusals -------------------------------------------------------------------


@pytest.mark.slow
def test_force_refuses_a_previous_run_that_holds_any_source(tmp_path, files):
    a, b = files
    target = tmp_path / "run"
    run(write_config(tmp_path, {"path": a.name}, "first.yaml"), target)
    inside = target / "exports" / "data"
    inside.mkdir(parents=True)
    payload = b.read_bytes()
    (inside / "b.jsonl").write_bytes(payload)
    manifest = {"path": "b.jsonl", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (inside / "manifest.json").write_text(json.dumps({"manifest_version": 1, "tool": "qlora-plugins", "files": [manifest]}))
    config = write_config(
        tmp_path,
        {"sources": [{"path": a.name}, {"path": str(inside / "b.jsonl"), "instruction_column": "question", "output_column": "answer"}]},
        "second.yaml",
    )
    result = run_cli("run", config, "--output", target, "--force", "--no-progress", registry=make_registry())
    assert result.exit_code == 2, result.output
    assert "the data" in result.stderr and "an input of this command" in result.stderr
    assert (inside / "b.jsonl").read_bytes() == payload


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"path": "a.jsonl", "sources": [{"path": "b.jsonl"}]}, "data.sources: set either data.path"),
        ({"sources": []}, "data.sources: must be a non-empty list"),
        ({"sources": "a.jsonl"}, "data.sources: must be a non-empty list"),
        ({"sources": ["a.jsonl"]}, "data.sources[0]: must be a mapping"),
        ({"sources": [{"weight": 1}]}, "data.sources[0].path: is required"),
        ({"sources": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]}, "data.sources[1].weight: give every source a weight"),
        ({"sources": [{"path": "a.jsonl", "weight": 0}]}, "data.sources[0].weight: must be a number > 0"),
        ({"sources": [{"path": "a.jsonl", "weight": True}]}, "data.sources[0].weight: must be a number > 0"),
        ({"sources": [{"path": "a.jsonl", "name": "text"}]}, "data.sources[0].name: every source is read with the section's data format"),
        ({"sources": [{"path": "a.jsonl", "max_length": 99}]}, "data.sources[0].max_length: set max_length once"),
        ({"sources": [{"path": "a.jsonl"}, {"path": "missing.jsonl"}]}, "data.sources[1].path: data file not found"),
        ({"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "output_colum": "answer"}]}, "data.sources[1].output_colum: unknown key"),
        ({"sources": [{"path": "a.jsonl"}], "template": "{nope}"}, "data.template: unknown placeholder"),
    ],
)
def test_bad_sources_are_refused_in_one_line(tmp_path, files, data, fragment):
    result = run_cli("validate", write_config(tmp_path, data), registry=make_registry())
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error:") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.output


def test_sources_refused_for_classification(tmp_path):
    data = tmp_path / "labels.csv"
    data.write_text("text,label\nok,a\nbad,b\n", encoding="utf-8")
    config = {
        "model": {"source": "tiny-bert", "task": "seq_cls"},
        "data": {"name": "classification", "sources": [{"path": str(data)}, {"path": str(data)}]},
        "train": {"max_steps": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_cli("run", path, "--output", tmp_path / "run", registry=make_registry())
    assert result.exit_code == 2 and "data.sources" in result.stderr.strip().splitlines()[-1] and "seq_cls" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_source_error_names_the_source(tmp_path, files):
    a, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": ["a", "list"]}) + "\n", encoding="utf-8")
    config = write_config(tmp_path, {"sources": [{"path": a.name}, {"path": bad.name}]})
    result = run_cli("run", config, "--output", tmp_path / "run", "--no-progress", registry=make_registry())
    assert result.exit_code == 2, result.output
    assert "data.sources[1].path: bad.jsonl row 1 column 'output'" in result.stderr
