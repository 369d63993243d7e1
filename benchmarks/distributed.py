"""Distributed training on CPU: one process against two (DDP and FSDP), one thread each.

Each configuration is a real ``qlora run`` (two processes through ``--nproc-per-node 2``) on a
random-init Llama of 336M parameters (benchmarks/memory.py's ``336m``), NF4 + double
quantization, LoRA r=16 on every linear layer, gradient checkpointing, AdamW. The per-rank
micro-batch is the same in every configuration (``--per-rank-batch``), so two ranks train twice
the examples per step (the global ``train.batch_size`` doubles): throughput is the step's
trained tokens on all ranks over the median step time (the first step is warm-up).

Figures, all read from the runs' own report.json and metrics.jsonl:

* tokens/s of one process, DDP on two and FSDP on two, and the ratios to one process
  (target: DDP >= 1.6x);
* every rank's peak RSS;
* every rank's resident bytes of the packed base weights (target: FSDP <= 0.55x one process).

Rounds are interleaved (one, ddp, fsdp, one, ddp, fsdp, ...) and medians quoted, because the
machine is shared: the load average before and after each run is recorded next to the figures.

    .venv/bin/python benchmarks/distributed.py            # writes benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory import ARCHS, checkpoint_for  # noqa: E402


def write_data(directory: Path, rows: int = 64) -> Path:
    words = "the quick brown fox jumps over the lazy dog while a small bird sings".split()
    path = directory / "data.jsonl"
    lines = []
    for i in range(rows):
        text = " ".join(words[(i + j) % len(words)] for j in range(24))
        lines.append(json.dumps({"instruction": "Continue the text.", "input": text[:60], "output": text}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config(directory: Path, model: Path, data: Path, name: str, batch: int, steps: int, strategy: str) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "quantizer": {"name": "nf4", "double_quant": True},
        "adapter": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "data": {"name": "instruction", "path": str(data), "max_length": 128},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "seed": 0,
            "threads": 1,
            "distributed": strategy,
            "gradient_checkpointing": True,
        },
        "export": [],
    }
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def run_one(cfg: Path, out: Path, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QLORA_PLUGINS_DISABLE_AUTOLOAD": "1"}
    args = [sys.executable, "-m", "qlora_plugins", "run", str(cfg), "-o", str(out), "--force", "--no-progress"]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({cfg.name}, {nproc} procs): {done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][1:]  # the first step is warm-up
    step_s = statistics.median(r["step_time_s"] for r in steps)
    tokens = statistics.median(r["tokens"] for r in steps)
    dist = report.get("distributed") or {}
    ranks = dist.get("ranks") or [
        {"rank": 0, "peak_rss_bytes": report["memory"]["peak_rss_bytes"], "base_weight_bytes": report["quantization"]["quantized_bytes"]}
    ]
    return {
        "processes": nproc,
        "strategy": dist.get("strategy", "none"),
        "global_batch": report_batch(cfg),
        "median_step_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "per_rank_peak_rss_mb": [round(r["peak_rss_bytes"] / 1e6, 1) for r in ranks],
        "per_rank_base_weight_bytes": [r.get("base_weight_bytes") for r in ranks],
        "wall_s": round(wall, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def report_batch(cfg: Path) -> int:
    return json.loads(cfg.read_text())["train"]["batch_size"]


def plan_per_rank(model: Path, batch: int, world: int, strategy: str | None) -> dict:
    """What ``qlora plan`` predicts per rank for the same settings (host peak on a CPU)."""
    args = [sys.executable, "-m", "qlora_plugins", "plan", str(model), "--device", "cpu", "--batch", str(batch), "--seq", "128"]
    args += ["--optimizer", "adamw", "--lora-r", "16", "--json"]
    if world > 1:
        args += ["--world-size", str(world), "--strategy", strategy or "ddp"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    totals = json.loads(done.stdout)["totals"]
    return {"host_peak_mb": round(totals["host_peak_bytes"] / 1e6, 1), "weights_mb": round(totals["weights_bytes"] / 1e6, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="336m", choices=sorted(ARCHS))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("QLORA_BENCH_CACHE", "/tmp/qlora-bench")))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per-rank-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "distributed.json")
    args = parser.parse_args(argv)
    import torch

    model = checkpoint_for(args.cache, args.arch, log=lambda m: print(m, file=sys.stderr))
    b = args.per_rank_batch
    runs: dict[str, list] = {"one": [], "ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory(prefix="qlora-dist-bench-") as tmp:
        work = Path(tmp)
        data = write_data(work)
        configs = {
            "one": (config(work, model, data, "one", b, args.steps, "auto"), 1),
            "ddp": (config(work, model, data, "ddp", 2 * b, args.steps, "ddp"), 2),
            "fsdp": (config(work, model, data, "fsdp", 2 * b, args.steps, "fsdp"), 2),
        }
        for r in range(args.rounds):
            for name, (cfg, nproc) in configs.items():
                print(f"round {r + 1}: {name}", file=sys.stderr)
                runs[name].append(run_one(cfg, work / f"{name}-{r}", nproc))

    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    one_bytes = runs["one"][0]["per_rank_base_weight_bytes"][0]
    fsdp_bytes = max(runs["fsdp"][0]["per_rank_base_weight_bytes"])
    ddp_ratio = med("ddp", "tokens_per_s") / med("one", "tokens_per_s")
    result = {
        "benchmark": "distributed",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "threads_per_process": 1, "note": "shared machine: see the load averages per run"},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "settings": {
            "arch": args.arch,
            "params_m": 336.1 if args.arch == "336m" else None,
            "quantizer": "nf4 + DQ",
            "lora": "r=16 all-linear",
            "per_rank_batch": b,
            "max_length": 128,
            "steps": args.steps,
            "warmup_steps": 1,
            "rounds": args.rounds,
        },
        "runs": runs,
        "summary": {
            "tokens_per_s": {name: round(med(name, "tokens_per_s"), 2) for name in runs},
            "ddp_throughput_ratio": round(ddp_ratio, 3),
            "fsdp_throughput_ratio": round(med("fsdp", "tokens_per_s") / med("one", "tokens_per_s"), 3),
            "fsdp_base_weight_bytes_ratio": round(fsdp_bytes / one_bytes, 4),
            "per_rank_peak_rss_mb": {name: runs[name][0]["per_rank_peak_rss_mb"] for name in runs},
            "planned_per_rank": {
                "one": plan_per_rank(model, b, 1, None),
                "ddp": plan_per_rank(model, 2 * b, 2, "ddp"),
                "fsdp": plan_per_rank(model, 2 * b, 2, "fsdp"),
            },
        },
        "targets": {
            "ddp_throughput_ratio >= 1.6": ddp_ratio >= 1.6,
            "fsdp_base_weight_bytes_ratio <= 0.55": fsdp_bytes / one_bytes <= 0.55,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
