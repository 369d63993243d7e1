"""Benchmark: QLoRA on a checkpoint whose bf16 weights alone are bigger than this machine's RAM,
printed as ONE JSON object.

1. Writes a Llama-architecture checkpoint (default: Llama-2-13B's shapes with 42 layers, 13.65B
   parameters, 27.3 GB = 25.4 GiB of bf16 in 2 GB shards) shard by shard, never holding it whole.
   The random init is cheap and deterministic: one random N(0, 0.02) tile of 2^22 values, repeated
   with a random offset and a random per-tensor scale in [0.5, 1.5] (so weights have a realistic
   spread and blocks differ; they are not i.i.d.). Written once and reused (``--checkpoint``).
2. Runs ``qlora run`` on it (nf4 + double quantization, quantize-while-loading, LoRA r=4 on all
   linear layers, gradient checkpointing, batch 1, sequences of at most ``--seq`` tokens, 2
   optimizer steps, adamw) in a child process, optionally inside a cgroup v1 memory limit
   (``--limit-gib``; the process is moved into a child of this process's own memory cgroup, which
   is removed afterwards), and reports the run's peak RSS, load time and step times (from its
   report.json), plus the peak the planner predicted.

Needs ~28 GB free on the checkpoint's file system; takes tens of minutes on 2 cores. Not part of
the test suite.

Usage: ``python benchmarks/bigger_than_ram.py [--checkpoint DIR] [--limit-gib 16] [--layers 42]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from memory import versions, write_llama_checkpoint  # noqa: E402


def arch(layers: int) -> dict:
    """Llama-2-13B's shapes (hidden 5120, 40 heads, intermediate 13824, vocab 32000), ``layers`` deep."""
    return dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=layers,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    )


def cgroup_root() -> Path | None:
    """This process's cgroup v1 memory directory, if there is one we can write."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                root = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                return root if os.access(root, os.W_OK) else None
    except OSError:
        return None
    return None


def run_limited(cmd: list[str], limit_bytes: int | None, log_path: Path) -> tuple[int, dict]:
    """Run ``cmd`` (its stdout+stderr into ``log_path``), inside a fresh memory cgroup capped at
    ``limit_bytes`` when given; returns the exit code and the cgroup's figures."""
    facts: dict = {}
    group = None
    if limit_bytes:
        root = cgroup_root()
        if root is None:
            facts["cgroup"] = "unavailable (no writable cgroup v1 memory controller); ran without a limit"
        else:
            group = root / f"qlora-bigger-than-ram-{os.getpid()}"
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            facts["cgroup"] = str(group)
            facts["limit_bytes"] = limit_bytes
    shell = f'echo $$ > "{group}/cgroup.procs" && exec "$@"' if group else 'exec "$@"'
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(["/bin/sh", "-c", shell, "sh", *cmd], stdout=log, stderr=subprocess.STDOUT)
        if group:
            facts["cgroup_max_usage_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
            facts["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
            oom = (group / "memory.oom_control").read_text()
            facts["oom_kills"] = int(next((l.split()[1] for l in oom.splitlines() if l.startswith("oom_kill ")), "0"))
    finally:
        if group:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.2)
    return proc.returncode, facts


def planner_prediction(checkpoint: Path, seq: int, r: int) -> dict | None:
    """What ``qlora plan`` predicts for this run (CPU host memory)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from qlora_plugins.cli import main; main()",
            "plan",
            str(checkpoint),
            "--quantizer",
            "nf4",
            "--batch",
            "1",
            "--seq",
            str(seq),
            "--lora-r",
            str(r),
            "--optimizer",
            "adamw",
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/qlora-bench/llama-13b-bf16"))
    parser.add_argument("--layers", type=int, default=42)
    parser.add_argument("--limit-gib", type=float, default=16.0, help="cgroup memory limit for the run (0: none)")
    parser.add_argument("--seq", type=int, default=96, help="data.max_length (the instruction prompts need > 32 byte tokens)")
    parser.add_argument("--r", type=int, default=4, help="LoRA rank")
    parser.add_argument("--output", type=Path, default=Path("/tmp/qlora-bench/run-13b"))
    parser.add_argument("--keep-checkpoint", action="store_true", help="do not delete the checkpoint afterwards")
    parser.add_argument("--write-only", action="store_true", help="only write the checkpoint")
    args = parser.parse_args()

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    ckpt = args.checkpoint
    report: dict = {
        "benchmark": "bigger_than_ram",
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
    }
    if not (ckpt / ".complete").is_file():
        need = 28.5e9
        free = shutil.disk_usage(ckpt.parent if ckpt.parent.exists() else Path("/tmp")).free
        if free < need:
            print(json.dumps({**report, "error": f"needs ~{need / 1e9:.0f} GB free on {ckpt.parent}, has {free / 1e9:.1f}"}))
            sys.exit(2)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_llama_checkpoint(ckpt, arch(args.layers), dtype="bfloat16", shard_bytes=2 * 10**9, tile=1 << 22, log=log)
        report["write_s"] = round(time.perf_counter() - t0, 1)
    if args.write_only:
        print(json.dumps(report, indent=2))
        return
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    total = index["metadata"]["total_size"]
    report["checkpoint"] = {
        "path": str(ckpt),
        "bf16_bytes": total,
        "bf16_gib": round(total / 2**30, 2),
        "params": total // 2,
        "arch": arch(args.layers),
        "bigger_than_ram": total > report["machine"]["ram_bytes"],
    }

    config = {
        "model": {"path": str(ckpt), "dtype": "float32"},
        "quantizer": {"name": "nf4", "double_quant": True, "blocksize": 64},
        "adapter": {"name": "lora", "r": args.r, "alpha": 2 * args.r, "target_modules": "all-linear"},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "data": {
            "name": "instruction",
            "path": str(REPO / "tests" / "data" / "instructions.jsonl"),
            "max_length": args.seq,
            "eval_fraction": 0.1,
        },
        "train": {"max_steps": 2, "batch_size": 1, "seed": 0, "gradient_checkpointing": True, "eval_max_batches": 1, "device": "cpu"},
        "export": [{"name": "adapter"}],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = args.output.parent / "bigger_than_ram.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = planner_prediction(ckpt, args.seq, args.r)
    if plan:
        report["planner"] = {
            "predicted_host_peak_bytes": plan.get("totals", {}).get("host_peak_bytes"),
            "predicted_over_baseline_bytes": plan.get("totals", {}).get("host_over_baseline_bytes"),
        }
    limit = int(args.limit_gib * 2**30) if args.limit_gib else None
    log(f"qlora run on {ckpt} (limit {args.limit_gib} GiB); log: {args.output}.log")
    t0 = time.perf_counter()
    rc, facts = run_limited(
        [shutil.which("qlora") or "qlora", "run", str(cfg_path), "--output", str(args.output), "--force", "--no-progress", "--json"],
        limit,
        Path(f"{args.output}.log"),
    )
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["returncode"] = rc
    report["cgroup"] = facts
    run_report = args.output / "report.json"
    if rc == 0 and run_report.is_file():
        r = json.loads(run_report.read_text())
        peak = r["memory"]["peak_rss_bytes"]
        report["run"] = {
            "peak_rss_bytes": peak,
            "peak_rss_gib": round(peak / 2**30, 2),
            "load_peak_rss_gib": round((r["memory"].get("load_peak_rss_bytes") or 0) / 2**30, 2),
            "fidelity": r.get("exports", {}).get("adapter", {}).get("fidelity", {}).get("status"),
            "load_s": r["timings"].get("load_s"),
            "train_s": r["timings"].get("train_s"),
            "total_s": r["timings"].get("total_s"),
            "step_times_s": [
                m.get("step_time_s")
                for m in map(json.loads, (args.output / "metrics.jsonl").read_text().splitlines())
                if "step_time_s" in m
            ],
            "losses": [r["training"]["first_loss"], r["training"]["last_loss"]],
            "quantized_bytes": r["quantization"]["quantized_bytes"],
            "bits_per_param": r["quantization"]["bits_per_param"],
            "load_path": r["quantization"].get("load"),
            "parameters": r["parameters"],
        }
        report["peak_vs_bf16_checkpoint"] = round(peak / total, 3)
        if report.get("planner", {}).get("predicted_host_peak_bytes"):
            report["planner"]["error"] = round(report["planner"]["predicted_host_peak_bytes"] / peak - 1, 3)
    else:
        report["log_tail"] = Path(f"{args.output}.log").read_text(errors="replace")[-2000:]
    if not args.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
        report["checkpoint"]["deleted"] = True
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
