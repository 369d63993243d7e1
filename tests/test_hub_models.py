"""``model.path`` as a Hugging Face Hub id, offline: a Hub cache built in the layout huggingface_hub
reads (``HF_HOME/hub/models--org--name/{refs,snapshots/<commit>,blobs}``) with a tiny model, then
`qlora run`, `qlora validate` and `qlora plan` on the id, a revision, bad ids, and the rules that
keep the cache an input (a local directory of the same name wins; nothing is written into the
cache)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import assert_user_error, base_config, invoke, new_registry

REPO_ID = "tiny-org/tiny-llama"
COMMIT = hashlib.sha1(b"tiny-llama main").hexdigest()
COMMIT_V0 = hashlib.sha1(b"tiny-llama v0").hexdigest()


def add_snapshot(hub: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """One snapshot of ``repo_id`` in the Hub cache layout: content-addressed blobs, the
    snapshot's files as relative links to them, and ``refs/<name>`` holding the commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch, tiny_llama_dir) -> Path:
    """HF_HOME with tiny-org/tiny-llama cached at main (weights, tokenizer) and at tag v0 (its
    config alone, as `qlora plan` leaves it), HF_HUB_OFFLINE=1."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {p.name: p.read_bytes() for p in sorted(tiny_llama_dir.iterdir()) if p.is_file()}
    add_snapshot(home / "hub", REPO_ID, COMMIT, files)
    config = json.loads(files["config.json"])
    config["num_hidden_layers"] = 2
    add_snapshot(home / "hub", REPO_ID, COMMIT_V0, {"config.json": json.dumps(config).encode()}, refs=("v0",))
    return home


def write(tmp_path: Path, **model) -> Path:
    config = base_config(model=model, train={"max_steps": 2, "batch_size": 4, "seed": 0, "threads": 1})
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def plan(*args):
    """``qlora plan ...`` with the builtin commands added (as ``main`` does)."""
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    registry = new_registry()
    registry.add_commands(cli)
    return CliRunner().invoke(cli, ["plan", *map(str, args)], obj={"registry": registry})


def digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in sorted(root.rglob("*")) if not p.is_dir()
    }


@pytest.mark.slow
def test_run_from_the_cache_records_the_commit(hf_home, tmp_path):
    before = digest(hf_home / "hub")
    out = tmp_path / "run"
    result = invoke("run", write(tmp_path, path=REPO_ID), "-o", out, "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["hub"] == {"repo_id": REPO_ID, "revision": None, "commit": COMMIT}
    assert report["model"]["path"].endswith(f"snapshots/{COMMIT}")
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["path"] == REPO_ID and resolved["model"]["revision"] == COMMIT  # pinned
    assert digest(hf_home / "hub") == before  # the cache is an input: nothing written into it
    # the finished run exports from the same pinned snapshot
    exported = invoke("export", out, "-e", "adapter", "-o", tmp_path / "exported")
    assert exported.exit_code == 0, exported.output


def test_validate_and_revisions(hf_home, tmp_path):
    assert invoke("validate", write(tmp_path, path=REPO_ID)).exit_code == 0
    assert invoke("validate", write(tmp_path, path=REPO_ID, revision=COMMIT)).exit_code == 0
    # v0 holds the config alone: a run needs weights, a plan does not
    assert_user_error(invoke("validate", write(tmp_path, path=REPO_ID, revision="v0")), "model.path", "no weights")


def test_plan_from_the_cached_config_alone(hf_home):
    result = plan(REPO_ID, "--revision", "v0", "--json")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["model"]["layers"] == 2 and planned["model"]["name"] == REPO_ID
    main = json.loads(plan(REPO_ID, "--json").stdout)
    assert main["model"]["layers"] == 4 and main["model"]["checkpoint_bytes"]


def test_bad_ids_offline(hf_home, tmp_path):
    assert_user_error(
        invoke("validate", write(tmp_path, path="tiny-org/not-cached")), "model.path", "tiny-org/not-cached", "HF_HUB_OFFLINE"
    )
    assert_user_error(invoke("validate", write(tmp_path, path=REPO_ID, revision="no-such-tag")), "no-such-tag", "HF_HUB_OFFLINE")
    assert_user_error(plan("tiny-org/not-cached"), "MODEL", "is no local directory", "not in the Hugging Face cache")
    assert_user_error(plan("llama-2-7b", "--revision", "main"), "--revision")
    assert_user_error(invoke("validate", write(tmp_path, source="tiny-llama", revision="main")), "model.revision", "model.source")
    # not Hub ids, so local paths: the old message
    for path in ("./tiny-org/x", "a/b/c", "/abs/olute"):
        assert_user_error(invoke("validate", write(tmp_path, path=path)), "model.path", "model directory not found")


@pytest.mark.parametrize(
    "error, fragments",
    [
        ("GatedRepoError", ("model.path", "is gated", "log in")),
        ("RepositoryNotFoundError", ("model.path", "neither a local directory nor a model on the Hugging Face Hub")),
        ("RevisionNotFoundError", ("model.revision", "has no revision 'v9'")),
        ("HfHubHTTPError", ("model.path", "cannot get")),
    ],
)
def test_hub_errors_are_one_line(error, fragments, hf_home, tmp_path, monkeypatch):
    """What the Hub answers online (gated, missing, no such revision, an HTTP error), through
    huggingface_hub's own exception types."""
    import huggingface_hub
    from huggingface_hub import errors

    try:  # huggingface_hub >= 2 ships its HTTP client as httpx2
        import httpx2 as httpx
    except ImportError:
        import httpx

    def refuse(*args, **kwargs):
        response = httpx.Response(403, request=httpx.Request("GET", "https://hub.invalid/api/models/gated-org/model"))
        raise getattr(errors, error)("the Hub said no", response=response)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert_user_error(invoke("validate", write(tmp_path, path="gated-org/model", revision="v9")), *fragments)


def test_a_local_directory_of_that_name_wins(hf_home, tmp_path, tiny_llama_dir):
    local = tmp_path / "tiny-org" / "tiny-llama"
    shutil.copytree(tiny_llama_dir, local)
    assert invoke("validate", write(tmp_path, path=REPO_ID)).exit_code == 0
    assert_user_error(invoke("validate", write(tmp_path, path=REPO_ID, revision="main")), "model.revision", "local directory")


def test_no_output_inside_the_cache(hf_home, tmp_path):
    snapshot = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    before = digest(hf_home / "hub")
    for out in (snapshot / "blobs" / "run", snapshot / "snapshots" / COMMIT / "run", snapshot):
        result = invoke("run", write(tmp_path, path=REPO_ID), "-o", out, "--force", "--no-progress")
        assert_user_error(result, "--output")
    assert digest(hf_home / "hub") == before
