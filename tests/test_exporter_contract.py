"""The exporter contract's declared methods: ``check`` runs before anything is loaded or trained,
``reload``/``verify``/``default_tolerance`` have documented defaults, and the host's keys of an
export's result are reserved."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import assert_user_error, base_config, invoke

from qlora_plugins import ExportCheck, Exporter
from qlora_plugins.exporting import GENERIC_TOLERANCE, RESERVED_RESULT_KEYS

SIGNING_EXPORTER = '''
import os
from qlora_plugins import Exporter, hookimpl
from qlora_plugins.errors import ExportError


class Signed(Exporter):
    """Refuses to start without a signing key."""

    name = "signed"

    def check(self, context):
        if not os.environ.get("SIGNING_KEY"):
            raise ExportError(f"{context.config_path}: exporter 'signed' needs SIGNING_KEY; set it before training")

    def export(self, context, output_dir):
        raise AssertionError("never reached in these tests")


@hookimpl
def register_exporters(register):
    register(Signed)
'''


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def test_an_exporter_check_refuses_before_anything_is_loaded(fake_distribution, tmp_path, monkeypatch):
    fake_distribution("signed-export", {"signed": "signed_export_plugin"}, {"signed_export_plugin": SIGNING_EXPORTER})
    monkeypatch.delenv("SIGNING_KEY", raising=False)
    config = write(tmp_path, base_config(export=[{"name": "adapter"}, {"name": "signed"}]))
    assert_user_error(invoke("validate", config), "export[1]", "SIGNING_KEY")
    out = tmp_path / "run"
    assert_user_error(invoke("run", config, "-o", out, "--no-progress"), "export[1]", "SIGNING_KEY")
    assert not out.exists()  # refused before the run directory, the model or the data


def test_merged_4bit_refuses_an_unquantized_run_before_training(tmp_path):
    config = write(tmp_path, base_config(quantizer={"name": "none"}, export=[{"name": "merged_4bit"}]))
    out = tmp_path / "run"
    assert_user_error(invoke("run", config, "-o", out, "--no-progress"), "export[0]", "merged_4bit", "blockwise")
    assert not out.exists()


def test_qlora_export_runs_the_check_before_loading(tmp_path):
    config = write(tmp_path, base_config(quantizer={"name": "none"}))
    out = tmp_path / "run"
    assert invoke("run", config, "-o", out, "--no-progress").exit_code == 0
    assert_user_error(invoke("export", out, "-e", "merged_4bit"), "--exporter merged_4bit", "blockwise")
    assert not (out / "exports" / "merged_4bit").exists()


class Bare(Exporter):
    name = "bare"

    def export(self, context, output_dir):
        return {}


def test_the_optional_methods_have_documented_defaults(tmp_path):
    bare = Bare()
    assert bare.default_tolerance() == GENERIC_TOLERANCE and bare.default_tolerance() is not GENERIC_TOLERANCE
    assert bare.verify(tmp_path, None) == {}
    assert bare.reload(tmp_path, None) is None  # no config.json: nothing loadable
    assert bare.check(ExportCheck("causal_lm", None, None)) is None
    assert {"exporter", "path", "files", "bytes", "seconds", "fidelity"} <= RESERVED_RESULT_KEYS
