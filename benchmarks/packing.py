"""Benchmark: trained tokens per second of our QLoRA with and without ``data.packing``, against
TRL's ``SFTTrainer`` (peft LoRA + bitsandbytes 4-bit) with packing off and on, in the same run;
and the packed-vs-unpacked equivalence of the loss and adapter gradients on the same model.
Prints ONE JSON object and writes it to benchmarks/results/packing.json.

Tokenizer: a byte-level BPE tokenizer of ``--vocab`` tokens trained (deterministically, with the
``tokenizers`` library) on the seed tasks themselves, so that examples have subword lengths like
a real model's (with the 260-token byte tokenizer of our tiny models they would be 3-4x longer
and nearly all cut at ``--max-length``).

Data: the alpaca seed tasks (``--data``, default /work/shared/data/alpaca_seed_tasks.jsonl: 175
tasks, one or more instances each) turned into instruction rows in a temporary directory, with
the instruction format's prompt template for both stacks (TRL gets ``prompt``/``completion``
rows, so it trains the completion only, like our instruction format). Variable lengths: with the
BPE tokenizer, examples run from ~20 to ~1500 tokens (cut at ``--max-length``).

Model: a Llama-architecture checkpoint with random init (seed 0), hidden 512, 10 layers,
intermediate 1536, 8 heads with 4 key/value heads, untied embeddings of the tokenizer's
vocabulary: 35.7M parameters at ``--vocab 4096``, fp32.
Same LoRA settings for both stacks: r=16, alpha=32, dropout 0.05, all linear layers; AdamW
(lr 2e-4), gradient checkpointing on, batch size ``--batch`` (examples unpacked, packed
sequences of ``--max-length`` tokens packed), one thread.

Each configuration runs in a fresh process (``--worker``), ``--steps`` optimizer steps
(``--unpacked-steps`` for the unpacked ones, so that both sample a similar number of examples)
of which the first is a warm-up; tokens per second = trained tokens (labels that are not -100 after the
shift) of the measured steps / their wall time. Ours: ``qlora run`` in-process, figures from
metrics.jsonl (``trained_tokens``, ``step_time_s``). TRL: the trainer's collator is wrapped to
count the trained tokens of every batch; a callback takes the time at every step end.

The machine is shared: the JSON records the load average before and after, and the ratios are
of runs made minutes apart, so read them with the load next to them.

Usage::

    python benchmarks/packing.py                 # ~10 minutes on 2 cores at load ~8
    python benchmarks/packing.py --steps 3 --batch 2 --max-length 256   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

ARCH = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=10,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
INPUT_TEMPLATE = "### Input:\n{input}\n\n"


def instruction_rows(seed_tasks: Path) -> list[dict]:
    """One instruction row per instance of every seed task."""
    rows = []
    for line in seed_tasks.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        for instance in task.get("instances", []):
            rows.append({"instruction": task["instruction"], "input": instance.get("input", ""), "output": instance["output"]})
    return rows


def write_model(directory: Path, rows: list[dict], vocab: int) -> Path:
    """The benchmark checkpoint: a BPE tokenizer trained on the rows' text and a seeded random
    Llama of :data:`ARCH` over its vocabulary (written once; ``.complete`` marks it)."""
    if (directory / ".complete").is_file():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [TEMPLATE + r["instruction"] + INPUT_TEMPLATE + r["input"] + r["output"] for r in rows]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCH,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    (directory / ".complete").write_text("ok\n", encoding="utf-8")
    return directory


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- workers -----------------------------------------------------------------------------------


def ours(spec: dict) -> dict:
    """``qlora run`` with or without packing; the figures from its metrics.jsonl."""
    import yaml

    from qlora_plugins.testing import make_registry, run_cli

    work = Path(spec["work"])
    name = "ours_packed" if spec["packing"] else "ours_unpacked"
    config = {
        "model": {"path": spec["model"]},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", **LORA, "target_modules": "all-linear"},
        "optimizer": {"name": "adamw", "lr": 2e-4},
        "data": {
            "name": "instruction",
            "path": spec["data"],
            "max_length": spec["max_length"],
            "eval_fraction": 0.0,
            "packing": spec["packing"],
            "min_kept_fraction": 0.0,
        },
        "train": {
            "max_steps": spec["steps"],
            "batch_size": spec["batch"],
            "seed": 0,
            "threads": 1,
            "gradient_checkpointing": True,
            "lr_scheduler": "constant",
        },
        "export": [],
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = work / name
    result = run_cli("run", path, "--output", out, "--no-progress", "--json", registry=make_registry())
    if result.exit_code != 0:
        raise RuntimeError(result.output[-2000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "trained_tokens" in r]
    report = json.loads((out / "report.json").read_text())
    measured = steps[1:]
    seconds = sum(r["step_time_s"] for r in measured)
    return {
        "config": name,
        "steps": len(steps),
        "trained_tokens": sum(r["trained_tokens"] for r in measured),
        "input_tokens": sum(r["tokens"] for r in measured),
        "seconds": round(seconds, 3),
        "step_times_s": [r["step_time_s"] for r in steps],
        "packing": report.get("data", {}).get("packing"),
        "losses": [round(r["loss"], 4) for r in steps],
    }


def equivalence(spec: dict) -> dict:
    """Loss and adapter gradients of the same examples packed and unpacked on the benchmark
    model (our QLoRA stack, fp32, LoRA dropout 0)."""
    import torch
    import yaml

    from qlora_plugins.api import Pipeline, load_config, step_loss
    from qlora_plugins.data import collate, collate_packed, pack_examples, trained_tokens
    from qlora_plugins.testing import make_registry

    torch.set_num_threads(1)
    work = Path(spec["work"])
    config = {
        "model": {"path": spec["model"]},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", **{**LORA, "dropout": 0.0}, "target_modules": "all-linear"},
        "data": {
            "name": "instruction",
            "path": spec["data"],
            "max_length": spec["max_length"],
            "eval_fraction": 0.0,
            "max_examples": 10,
            "min_kept_fraction": 0.0,
        },
        "train": {"max_steps": 1, "seed": 0, "threads": 1, "gradient_checkpointing": False},
        "export": [],
    }
    path = work / "equivalence.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    pipeline = Pipeline(load_config(path), make_registry(), work / "equivalence", progress=False)
    prepared = pipeline.prepare(pipeline.check())
    attached = pipeline.attach(prepared, pipeline.load(prepared))
    model, examples, pad = attached.model, list(prepared.splits.train), prepared.tokenizer.pad_token_id
    packs, stats = pack_examples(examples, spec["max_length"], seed=0)

    def run(batch: dict, total: int) -> tuple[float, list]:
        model.zero_grad(set_to_none=True)
        loss = step_loss(model, batch, "causal_lm") / total
        loss.backward()
        return loss.item(), [p.grad.detach().clone() for p in attached.params]

    unpacked = collate(examples, pad, "causal_lm")
    total = trained_tokens(unpacked, "causal_lm")
    loss_u, grads_u = run(unpacked, total)
    loss_p, grads_p = run(collate_packed(packs, pad, torch.float32), total)
    return {
        "examples": len(examples),
        "packs": stats.packs,
        "trained_tokens": total,
        "loss_unpacked": loss_u,
        "loss_packed": loss_p,
        "max_abs_loss_diff": abs(loss_u - loss_p),
        "max_abs_grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads_u, grads_p)),
        "max_abs_grad": max(float(g.abs().max()) for g in grads_u),
    }


def efficiency(spec: dict) -> dict:
    """Data arithmetic, no timing: over one epoch in our loop's batch order, the token positions
    computed (batch size x the longest item of each batch) and the trained tokens, unpacked and
    packed. Their ratio bounds the speed-up packing can give when a step costs in proportion to
    its positions."""
    import yaml

    from qlora_plugins.api import Pipeline, load_config
    from qlora_plugins.core.training import epoch_order
    from qlora_plugins.data import pack_examples
    from qlora_plugins.testing import make_registry

    work = Path(spec["work"])
    config = {
        "model": {"path": spec["model"]},
        "data": {
            "name": "instruction",
            "path": spec["data"],
            "max_length": spec["max_length"],
            "eval_fraction": 0.0,
            "min_kept_fraction": 0.0,
        },
        "train": {"max_steps": 1, "seed": 0},
        "export": [],
    }
    path = work / "efficiency.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    pipeline = Pipeline(load_config(path), make_registry(), work / "efficiency", progress=False)
    examples = list(pipeline.prepare(pipeline.check()).splits.train)
    packs, stats = pack_examples(examples, spec["max_length"], seed=0)
    trained = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)

    def positions(items: list) -> int:
        order, batch, total = epoch_order(len(items), 0, 0), spec["batch"], 0
        for start in range(0, len(items), batch):
            chunk = [items[i] for i in order[start : start + batch]]
            total += len(chunk) * max(len(c["input_ids"]) for c in chunk)
        return total

    unpacked, packed = positions(examples), positions(packs)
    return {
        "examples": len(examples),
        "packs": stats.packs,
        "fill": stats.fill,
        "trained_tokens": trained,
        "positions_unpacked": unpacked,
        "positions_packed": packed,
        "trained_per_position_unpacked": round(trained / unpacked, 4),
        "trained_per_position_packed": round(trained / packed, 4),
        "speedup_bound": round(unpacked / packed, 3),
    }


def trl(spec: dict) -> dict:
    """TRL's SFTTrainer on the same model, data, LoRA settings and batch size."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    name = "trl_packed" if spec["packing"] else "trl_unpacked"
    rows = json.loads(Path(spec["rows"]).read_text())
    records = []
    for r in rows:
        block = INPUT_TEMPLATE.format(input=r["input"]) if r["input"] else ""
        records.append({"prompt": TEMPLATE.format(instruction=r["instruction"], input_block=block), "completion": r["output"]})
    dataset = Dataset.from_list(records)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=bnb, dtype=torch.float32)
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"
    )
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / name),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=spec["max_length"],
        packing=spec["packing"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    counts: list[int] = []
    inner = trainer.data_collator

    def counting(features: list) -> Any:
        batch = inner(features)
        counts.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    steps = len(ends)
    seconds = ends[-1] - ends[0]
    return {
        "config": name,
        "steps": steps,
        "trained_tokens": sum(counts[1:steps]),
        "seconds": round(seconds, 3),
        "step_times_s": [round(b - a, 3) for a, b in zip(ends, ends[1:])],
        "trl": __import__("trl").__version__,
    }


WORKERS = {"ours": ours, "trl": trl, "equivalence": equivalence, "efficiency": efficiency}


def run_worker(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.setdefault("QLORA_PLUGINS_DISABLE_AUTOLOAD", "1")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"config": spec.get("name"), "error": (proc.stderr or proc.stdout)[-1500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def _rate(result: dict) -> float | None:
    if "error" in result or not result.get("seconds"):
        return None
    return round(result["trained_tokens"] / result["seconds"], 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "trl", "qlora-plugins"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/alpaca_seed_tasks.jsonl"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/qlora-bench"))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the first is a warm-up)")
    parser.add_argument(
        "--unpacked-steps",
        type=int,
        default=9,
        help="optimizer steps of the unpacked configurations (the first is a warm-up): more than packed, so that both measure a "
        "similar number of examples (a pack holds ~3.8 of them)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096, help="size of the BPE tokenizer trained on the data")
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "packing.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return

    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    rows = instruction_rows(args.data)
    model = write_model(args.cache / f"llama-packing-bpe{args.vocab}", rows, args.vocab)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(str(model))).parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    token_lengths = sorted(
        len(tokenizer(TEMPLATE + r["instruction"] + (INPUT_TEMPLATE + r["input"] if r["input"] else "") + r["output"])["input_ids"])
        for r in rows
    )
    load_before = _load()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlora-packing-") as tmp:
        work = Path(tmp)
        (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (work / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
        base = {"model": str(model), "data": str(work / "rows.jsonl"), "rows": str(work / "rows.json"), "work": tmp}
        base.update(steps=args.steps, batch=args.batch, max_length=args.max_length)
        plan = [
            ("ours_unpacked", {"kind": "ours", "packing": False, "steps": args.unpacked_steps}),
            ("ours_packed", {"kind": "ours", "packing": True}),
            ("trl_unpacked", {"kind": "trl", "packing": False, "steps": args.unpacked_steps}),
            ("trl_packed", {"kind": "trl", "packing": True}),
            ("equivalence", {"kind": "equivalence"}),
            ("efficiency", {"kind": "efficiency"}),
        ]
        results: dict[str, dict] = {}
        for name, extra in plan:
            if args.only and name not in args.only:
                continue
            print(f"running {name} (load {_load()})", file=sys.stderr)
            results[name] = {**run_worker({**base, **extra, "name": name}, args.timeout), "load_after": _load()}
    rates = {name: _rate(r) for name, r in results.items() if name not in ("equivalence", "efficiency")}
    out = {
        "benchmark": "packing",
        "model": {"arch": "llama", "parameters": n_params, **ARCH},
        "data": {
            "file": str(args.data),
            "examples": len(rows),
            "tokens_per_example": {"min": token_lengths[0], "median": statistics.median(token_lengths), "max": token_lengths[-1]},
            "vocab": len(tokenizer),
            "max_length": args.max_length,
        },
        "settings": {
            "unpacked_steps": args.unpacked_steps,
            "batch_size": args.batch,
            "steps": args.steps,
            "warmup_steps": 1,
            "threads": 1,
            "lora": LORA,
            "gradient_checkpointing": True,
        },
        "trained_tokens_per_s": rates,
        "ratios": {
            "ours_packed_vs_ours_unpacked": _ratio(rates.get("ours_packed"), rates.get("ours_unpacked")),
            "ours_packed_vs_trl_packed": _ratio(rates.get("ours_packed"), rates.get("trl_packed")),
            "ours_unpacked_vs_trl_unpacked": _ratio(rates.get("ours_unpacked"), rates.get("trl_unpacked")),
            "trl_packed_vs_trl_unpacked": _ratio(rates.get("trl_packed"), rates.get("trl_unpacked")),
        },
        "targets": {"ours_packed_vs_ours_unpacked": ">= 1.5", "ours_packed_vs_trl_packed": "> 1.0"},
        "equivalence": results.get("equivalence"),
        "data_efficiency": results.get("efficiency"),
        "runs": {k: v for k, v in results.items() if k not in ("equivalence", "efficiency")},
        "load_average": {"before": load_before, "after": _load()},
        "cpu_count": os.cpu_count(),
        "seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
    }
    text = json.dumps(out, indent=1)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_name(f".{args.output.name}.tmp")
    tmp_out.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp_out, args.output)


if __name__ == "__main__":
    main()
