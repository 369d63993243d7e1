"""A third-party quantizer package (examples/plugins/qlora-hqq4) installed for real: it is listed,
passes the conformance kit, trains with LoRA and exports through `qlora run`, is planned by
`qlora plan --quantizer hqq4`, and shows up in `qlora quant-report`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "examples" / "plugins" / "qlora-hqq4"


@pytest.fixture(scope="module")
def hqq4_installed():
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(PACKAGE)]
    subprocess.run(pip, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "qlora-hqq4"], capture_output=True)


def qlora(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QLORA_PLUGINS_HOME": str(home), "QLORA_PLUGINS_DISABLE_AUTOLOAD": "0"}
    code = "from qlora_plugins.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_hqq4_end_to_end(hqq4_installed, tiny_llama_dir, qlora_home, tmp_path):
    listed = qlora("plugins", "--kind", "quantizer", "--json", home=qlora_home)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["plugins"]}
    assert rows["hqq4"]["distribution"] == "qlora-hqq4"

    from qlora_hqq4 import HQQ4

    from qlora_plugins.testing import run_quantizer_checks

    run_quantizer_checks(HQQ4, {"iterations": 3})

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Echo", "input": str(i), "output": str(i)}) + "\n" for i in range(12)))
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"path": str(tiny_llama_dir)},
                "quantizer": {"name": "hqq4", "iterations": 2, "double_quant": True},
                "adapter": {"name": "lora", "r": 4},
                "optimizer": {"name": "adamw"},
                "data": {"name": "instruction", "path": str(data), "max_length": 96},
                "train": {"max_steps": 2, "batch_size": 4},
            }
        )
    )
    run = qlora("run", str(config), "-o", str(tmp_path / "run"), "--no-progress", home=qlora_home)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["plugins"]["quantizer"]["distribution"] == "qlora-hqq4"
    assert report["quantization"]["quantized_params"] > 0
    assert (tmp_path / "run" / "exports" / "adapter" / "adapter_model.safetensors").exists()

    # the planner knows hqq4 only through its declared planned_bytes: the same bytes as the run
    planned = qlora("plan", str(tiny_llama_dir), "--quantizer", "hqq4", "--device", "cpu", "--json", home=qlora_home)
    assert planned.returncode == 0, planned.stderr
    rows = {r["component"]: r["host_bytes"] for r in json.loads(planned.stdout)["rows"]}
    assert rows["base_weights"] + rows["quant_constants"] == report["quantization"]["quantized_bytes"]

    compared = qlora("quant-report", str(tiny_llama_dir), "--quantizers", "int4_asym,hqq4", "--json", home=qlora_home)
    assert compared.returncode == 0, compared.stderr
    results = {r["quantizer"]: r for r in json.loads(compared.stdout)["results"]}
    # least-squares refinement lowers the weight error of plain min/max int4
    assert results["hqq4"]["weight_mse"] < results["int4_asym"]["weight_mse"]
