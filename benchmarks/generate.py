"""Generation speed of `qlora generate`'s code path against plain transformers `generate`
(the anchor), on a freshly trained tiny run, in one process, interleaved A B A B.

    python benchmarks/generate.py [--new-tokens 48] [--reps 5]

Measures greedy tokens/s of: the anchor (``model.generate`` on the merged export, fp32), ours on
the merged export (``qlora_plugins.inference.generate``: streaming decode and the stop check
included), ours on the run directory (nf4 4-bit base + LoRA adapter, as trained) and the anchor
on that same run model. Prints one JSON object and writes it to benchmarks/results/generate.json.
One thread (torch.set_num_threads(1)); the machine's load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("QLORA_PLUGINS_HOME", tempfile.mkdtemp(prefix="qhome-bench-"))
    from qlora_plugins.api import create_registry, parse_config, run
    from qlora_plugins.inference import Sampling, generate, load_target, render_messages

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    config = {
        "model": {"source": "tiny-llama"},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", "r": 4, "alpha": 8},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "data": {"name": "instruction", "path": str(REPO / "tests" / "data" / "instructions.jsonl"), "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "threads": 1},
        "export": [{"name": "merged"}],
    }
    registry = create_registry(load_entrypoints=False)
    run(parse_config(config, None), registry, work / "run", progress=False)
    targets = {"merged": load_target(work / "run" / "exports" / "merged", registry), "run": load_target(work / "run", registry)}
    sampling = Sampling(max_new_tokens=args.new_tokens)
    times: dict[str, list[float]] = {}

    def timed(label: str, fn) -> None:
        started = time.perf_counter()
        tokens = fn()
        times.setdefault(label, []).append(tokens / (time.perf_counter() - started))

    for _ in range(args.reps + 1):  # the first round is a warm-up, dropped below
        for name, target in targets.items():
            ids = render_messages(target.tokenizer, [{"role": "user", "content": "Hello"}], chat=False)
            x = torch.tensor([ids])

            def anchor(model=target.model, x=x) -> int:
                with torch.no_grad():
                    out = model.generate(input_ids=x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                return out.shape[1] - x.shape[1]

            def ours(target=target, ids=ids) -> int:
                produced: list[int] = []
                inner = target.model.generate

                def counting(*a, **k):  # count the tokens generate() produced (re-tokenizing the text would not)
                    out = inner(*a, **k)
                    produced.append(out.shape[1] - len(ids))
                    return out

                target.model.generate = counting
                try:
                    generate(target.model, target.tokenizer, ids, sampling)
                finally:
                    del target.model.generate
                return produced[0]

            timed(f"{name}/transformers_generate", anchor)
            timed(f"{name}/qlora_generate", ours)
    medians = {k: round(statistics.median(v[1:]), 1) for k, v in times.items()}
    result = {
        "benchmark": "generate",
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "tokens_per_s_median": medians,
        "ratio_ours_vs_anchor": {
            name: round(medians[f"{name}/qlora_generate"] / medians[f"{name}/transformers_generate"], 3) for name in targets
        },
        "ratio_run_4bit_vs_merged_fp32_anchor": round(medians["run/transformers_generate"] / medians["merged/transformers_generate"], 3),
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "note": "tiny-llama (random init); ours stops at EOS (the anchor is forced to new_tokens), tokens/s counts the tokens each produced",
    }
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / "generate.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
