"""Distributed training for real, on CPU with gloo: every run below is a multi-process job started
by ``qlora run --nproc-per-node 2`` (torchrun's elastic agent) or, for two "nodes" on loopback, by
two ``qlora run --nnodes 2`` processes meeting at a c10d rendezvous on 127.0.0.1.

Proven: DDP and FSDP give the one-process adapter within the reduce-order tolerance
(docs/distributed.md); a SIGKILL of the whole job and ``--resume`` (here under the other strategy)
end at the same adapter; a rank that raises stops the job with one line naming it and nothing
half-written, and the run resumes on another world size (one process); FSDP keeps about half of
the packed base on each of two ranks; a third-party quantizer (the hqq4 example) trains under
FSDP across two nodes; bad combinations are refused before anything loads, naming the option.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_plugins.testing import make_registry, run_cli

REPO = Path(__file__).resolve().parents[1]
#: max |adapter(ranks) - adapter(one process)| after STEPS Adam steps: the ranks sum their
#: gradients in another order than one process does (measured ~4e-6 on weights of ~0.1).
TOLERANCE = 1e-4
STEPS = 6
WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger"] * 4


def config_for(tmp: Path, model_dir: Path, name: str, quantizer: dict | None = None, **train) -> Path:
    data = tmp / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"instruction": "Repeat the word.", "input": w, "output": w}) + "\n" for w in WORDS))
    config = {
        "model": {"path": str(model_dir)},
        "quantizer": quantizer or {"name": "nf4", "double_quant": True},
        "adapter": {"name": "lora", "r": 4, "dropout": 0.0},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "data": {"name": "instruction", "path": str(data), "max_length": 96},
        "train": {"max_steps": STEPS, "batch_size": 4, "seed": 3, "threads": 1, "checkpoint_every": 1, **train},
        "export": [],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def qlora(*args: str, env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_plugins", *map(str, args), "--no-progress"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def adapter_of(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def steps_logged(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def reference(work: Path, tiny_llama_dir: Path) -> Path:
    """The one-process run every distributed run is compared with (exports on, as a user has)."""
    config = json.loads(config_for(work, tiny_llama_dir, "reference").read_text())
    config.pop("export")
    path = work / "reference-export.yaml"
    path.write_text(json.dumps(config))
    code, _, err = finished(qlora("run", path, "-o", work / "reference"))
    assert code == 0, err
    return work / "reference"


# --- refusals, before anything loads (in-process: the launcher refuses before torchrun starts) ---


@pytest.mark.parametrize(
    "train, sections, option",
    [
        ({"batch_size": 3}, {}, "train.batch_size"),
        ({"distributed": "none"}, {}, "train.distributed"),
        ({"distributed": "fsdp"}, {"optimizer": {"name": "paged_adamw"}}, "optimizer.name"),
        ({"distributed": "fsdp"}, {"optimizer": {"name": "offload_adamw"}}, "optimizer.name"),
        ({"distributed": "fsdp"}, {"quantizer": {"name": "nf4", "backend": "bitsandbytes"}}, "quantizer.backend"),
    ],
)
def test_refused_before_anything_loads(tmp_path, tiny_llama_dir, train, sections, option):
    config = json.loads(config_for(tmp_path, tiny_llama_dir, "c", **train).read_text())
    config.update(sections)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(config))
    result = run_cli("run", path, "-o", tmp_path / "out", "--nproc-per-node", "2", registry=make_registry())
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {option}"), result.stderr
    assert not (tmp_path / "out").exists()


def test_launch_options_refused(tmp_path, tiny_llama_dir, monkeypatch):
    path = config_for(tmp_path, tiny_llama_dir, "c")
    result = run_cli("run", path, "-o", tmp_path / "out", "--nnodes", "2", registry=make_registry())
    assert result.exit_code == 2 and "Error: --rdzv-endpoint" in result.stderr
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("run", path, "-o", tmp_path / "out", "--nproc-per-node", "2", registry=make_registry())
    assert result.exit_code == 2 and "Error: --nproc-per-node" in result.stderr
    assert not (tmp_path / "out").exists()


def test_environment_detection_and_rank_shares():
    from qlora_plugins.core.distributed import World, detect, rank_slice

    assert detect({}) is None
    assert detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    from qlora_plugins.errors import DistributedError

    with pytest.raises(DistributedError):
        detect({"RANK": "2", "WORLD_SIZE": "2"})
    batch = list(range(7))
    shares = [rank_slice(batch, World(r, 3, r)) for r in range(3)]
    assert sum(shares, []) == batch and max(map(len, shares)) - min(map(len, shares)) <= 1


# --- real multi-process jobs ----------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_killed_and_resumed_under_fsdp_equals_one_process(work, reference):
    """DDP on two ranks, the whole job SIGKILLed after a checkpoint, resumed under FSDP: the
    adapter of the uninterrupted one-process run; metrics.jsonl has each step once; the exports
    have exactly the one-process files; report.json records world size, strategy and both ranks."""
    config = work / "reference-export.yaml"
    out = work / "ddp"
    job = qlora("run", config, "-o", out, "--nproc-per-node", "2", new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-00000002").is_dir():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1]
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher (torchrun's agent); its ranks die with it
    job.wait()
    time.sleep(1.0)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    time.sleep(1.0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before, "a rank outlived the launcher"
    assert not (out / "report.json").exists()
    resumed = qlora("run", config, "--resume", out, "--nproc-per-node", "2", "--set", "train.distributed=fsdp")
    code, _, err = finished(resumed)
    assert code == 0, err
    assert max_difference(adapter_of(out), adapter_of(reference)) < TOLERANCE
    assert steps_logged(out) == list(range(1, STEPS + 1))
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["strategy"] == "fsdp"
    assert [r["rank"] for r in report["distributed"]["ranks"]] == [0, 1]
    assert all(r["peak_rss_bytes"] > 0 for r in report["distributed"]["ranks"])
    assert report["training"]["resumed_from_step"] >= 2

    def files(run: Path) -> set:
        return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}

    assert files(out) == files(reference)
    one, two = (json.loads((r / "exports" / "adapter" / "adapter_config.json").read_text()) for r in (reference, out))
    assert one == two


@pytest.mark.slow
def test_ddp_with_packing_and_accumulation_equals_one_process(work, tiny_llama_dir):
    """Packed sequences and 2 micro-batches per step on 2 ranks: the loss of every rank is
    divided by the trained tokens of the whole step on all ranks, so the adapter is the
    one-process adapter of the same config (the per-batch-mean mistake would not be)."""
    runs = {}
    for name, extra in (("packed-one", []), ("packed-ddp", ["--nproc-per-node", "2"])):
        config = config_for(work, tiny_llama_dir, name, gradient_accumulation_steps=2, max_steps=4)
        data = json.loads(config.read_text())
        data["data"]["packing"] = True
        config.write_text(json.dumps(data))
        code, _, err = finished(qlora("run", config, "-o", work / name, *extra))
        assert code == 0, err
        runs[name] = work / name
    assert max_difference(adapter_of(runs["packed-ddp"]), adapter_of(runs["packed-one"])) < TOLERANCE
    rows = [json.loads(line) for line in (runs["packed-ddp"] / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (runs["packed-one"] / "metrics.jsonl").read_text().splitlines()]
    trained = [r["trained_tokens"] for r in rows if "loss" in r]
    assert trained == [r["trained_tokens"] for r in one if "loss" in r] and all(t > 0 for t in trained)


@pytest.mark.slow
def test_fsdp_rank_failure_then_resume_on_one_process(work, tiny_llama_dir, reference):
    """FSDP: rank 1 raises at step 3: exit 2, one line naming rank 1, the run marked failed with
    its checkpoints intact; ``--resume`` on one process finishes at the one-process adapter. Each
    rank held about half of the packed base weights."""
    config = config_for(work, tiny_llama_dir, "fsdp", distributed="fsdp")
    out = work / "fsdp"
    code, _, err = finished(qlora("run", config, "-o", out, "--nproc-per-node", "2", env={"QLORA_PLUGINS_FAULT_RANK": "1:3"}))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: rank 1: RuntimeError: fault injected"), err
    assert "Traceback" not in err
    assert json.loads((out / "run.json").read_text())["status"].startswith("failed")
    assert not (out / "adapter").exists() and not (out / "report.json").exists()
    assert (out / "checkpoints" / "step-00000002").is_dir()
    code, _, err = finished(qlora("run", config, "--resume", out, "--set", "train.distributed=auto"))
    assert code == 0, err
    assert max_difference(adapter_of(out), adapter_of(reference)) < TOLERANCE
    assert steps_logged(out) == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def hqq4_installed():
    package = REPO / "examples" / "plugins" / "qlora-hqq4"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(package)]
    subprocess.run(pip, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "qlora-hqq4"], capture_output=True)


@pytest.mark.slow
def test_third_party_quantizer_fsdp_on_two_nodes(work, tiny_llama_dir, hqq4_installed):
    """Two nodes of one process each on loopback (c10d rendezvous on 127.0.0.1): the hqq4
    example quantizer trains under FSDP; rank 0 alone writes; each rank holds ~1/2 of the base."""
    config = config_for(work, tiny_llama_dir, "nodes", quantizer={"name": "hqq4", "iterations": 2}, distributed="fsdp", max_steps=2)
    out = work / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    env = {"QLORA_PLUGINS_DISABLE_AUTOLOAD": "0"}
    nodes = [
        qlora(
            "run", config, "-o", out, "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, env=env
        )
        for n in (0, 1)
    ]
    results = [finished(node) for node in nodes]
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    report = json.loads((out / "report.json").read_text())
    assert report["plugins"]["quantizer"]["name"] == "hqq4"
    ranks = report["distributed"]["ranks"]
    total = report["quantization"]["quantized_bytes"]
    assert len(ranks) == 2 and all(0.4 * total < r["base_weight_bytes"] < 0.6 * total for r in ranks), (ranks, total)
    assert steps_logged(out) == [1, 2]


def test_plan_per_rank():
    """`qlora plan --world-size 2 --strategy fsdp` halves what FSDP shards and adds the gathered
    blocks; DDP keeps the weights and adds its buckets; --batch is the global micro-batch."""

    def plan(*args: str) -> dict:
        result = run_cli("plan", "llama-2-7b", "--optimizer", "adamw", "--batch", "2", "--json", *args, registry=make_registry())
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    def rows(data: dict) -> dict:
        return {r["component"]: r["device_bytes"] + r["host_bytes"] for r in data["rows"]}

    one, fsdp, ddp = plan(), plan("--world-size", "2", "--strategy", "fsdp"), plan("--world-size", "2")
    for key in ("base_weights", "quant_constants", "adapters", "optimizer"):
        assert rows(fsdp)[key] == pytest.approx(rows(one)[key] / 2)
        assert rows(ddp)[key] == pytest.approx(rows(one)[key])
    assert rows(fsdp)["fsdp_gathered"] > 0 and rows(ddp)["ddp_buckets"] == pytest.approx(rows(one)["adapter_grads"])
    assert (
        fsdp["totals"]["device_peak_bytes"]
        < ddp["totals"]["device_peak_bytes"]
        < one["totals"]["device_peak_bytes"] + rows(ddp)["ddp_buckets"]
    )
    assert fsdp["settings"]["world_size"] == 2 and fsdp["settings"]["strategy"] == "fsdp"
    refused = run_cli("plan", "llama-2-7b", "--batch", "3", "--world-size", "2", registry=make_registry())
    assert refused.exit_code == 2 and refused.stderr.startswith("Error: --batch")
    refused = run_cli(
        "plan", "llama-2-7b", "--world-size", "2", "--strategy", "fsdp", "--optimizer", "paged_adamw", registry=make_registry()
    )
    assert refused.exit_code == 2 and refused.stderr.startswith("Error: --optimizer")


@pytest.mark.slow
def test_every_builtin_quantizer_shards_under_fsdp():
    """Each builtin quantizer's QuantLinear layers, sharded by FSDP2 on two gloo ranks (with
    trainable LoRA-like layers beside them), give the unsharded output and gradients exactly,
    each rank keeping about half of the packed codes and constants."""
    names = ["nf4", "fp4", "int4_sym", "int4_asym", "none"]
    worker = Path(__file__).with_name("fsdp_quantizers_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), *names],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["quantizer"]: r for r in map(json.loads, (line for line in done.stdout.splitlines() if line.startswith("{")))}
    assert set(results) == set(names)
    for name, result in results.items():
        assert result["out_diff"] < 1e-5 and result["grad_diff"] < 1e-5, result
        if name != "none":
            assert 0.45 < result["share"] < 0.55, result
