"""Benchmark: preparing a big chat dataset, ours against TRL, printed as ONE JSON object (also
written to ``benchmarks/results/data_scale.json``).

1. Generates a deterministic synthetic chat file in ``--workdir`` (default
   ``/tmp/qlora-data-scale``, never the repository): ``--conversations`` rows (default 1M, about
   1 GB) of ``{"messages": [system, user, assistant]}``, and a byte-level BPE tokenizer trained
   offline on its sentence pool, with a ChatML chat template (no Hub).
2. Runs each contender in a fresh subprocess and measures its wall time and peak memory (the
   process and all its children, polled from ``/proc`` every 0.5 s: summed RSS, summed PSS (which
   counts a page shared by the workers once) and the largest ``ru_maxrss``):

   * ``ours``: a data format defined here (``bench_chat``: the tokenizer's ``apply_chat_template``
     per conversation, tokens truncated to ``--max-length``, every token trained) loaded through
     our machinery (``qlora_plugins.data.tokenize_cached``: streamed check, batched ``datasets``
     map over ``--num-proc`` workers, memory-mapped Arrow, the cache) with an empty
     ``QLORA_PLUGINS_HOME``; the builtin ``chat`` format is built on another branch, so this
     benchmark renders conversations itself;
   * ``trl``: ``datasets.load_dataset("json")`` and TRL's ``SFTTrainer`` construction (its dataset
     preparation for conversational data: ``apply_chat_template``, labels, truncation to the
     same ``max_length``, ``dataset_num_proc`` = the same workers) with the same tokenizer, on a
     one-layer model, with an empty Hugging Face cache;
   * ``ours_cached``: ``ours`` again, from the cache the first run wrote.

Usage::

    python benchmarks/data_scale.py                          # 1M conversations
    python benchmarks/data_scale.py --conversations 20000    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GENERATOR_VERSION = "1"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "the a model data train token loss batch layer weight river stone cloud lamp tiger apple garden "
    "answer question explain why how when where which value number list table chart python code "
    "function return error file line memory disk cache speed time step epoch learning rate adapter "
    "quantize block scale matrix vector gradient optimizer paper result figure measure test check "
    "small large quick slow simple clear exact honest first last next every some many few other"
).split()
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant that answers in plain words.",
    "You are an expert tutor. Explain step by step.",
    "You are a careful reviewer. Point out mistakes politely.",
]


# --- the data -------------------------------------------------------------------------------


def sentence_pool(rng: random.Random, n: int = 4000) -> list[str]:
    pool = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        pool.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    return pool


def generate(path: Path, conversations: int, seed: int = 0) -> dict:
    """Write the chat file (skipped when one from the same generator and size is there)."""
    stamp = path.with_suffix(".json")
    wanted = {"version": GENERATOR_VERSION, "conversations": conversations, "seed": seed}
    if path.is_file() and stamp.is_file():
        known = json.loads(stamp.read_text())
        if {k: known.get(k) for k in wanted} == wanted and known.get("bytes") == path.stat().st_size:
            return known
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    started = time.perf_counter()
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as out:
        lines = []
        for i in range(conversations):
            user = " ".join(rng.choices(pool, k=rng.randint(2, 6)))
            answer = " ".join(rng.choices(pool, k=rng.randint(4, 12)))
            row = {
                "messages": [
                    {"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
                    {"role": "user", "content": f"#{i}: {user}"},
                    {"role": "assistant", "content": answer},
                ]
            }
            lines.append(json.dumps(row))
            if len(lines) == 10000:
                out.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    info = {**wanted, "bytes": path.stat().st_size, "generate_s": round(time.perf_counter() - started, 1)}
    stamp.write_text(json.dumps(info))
    return info


def build_tokenizer(directory: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer (vocabulary 4096) trained on the sentence pool, with ChatML."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pool = sentence_pool(random.Random(seed)) + SYSTEMS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pool + [f"#{i}:" for i in range(1000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = CHATML
    tmp = directory.with_name(directory.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    os.replace(tmp, directory)
    return directory


# --- the contenders (run in a fresh process each) ---------------------------------------------


def _encode_chat(batch: dict, indices: list, *, tok: Any, max_length: int) -> dict:
    """Render each conversation with the tokenizer's chat template and tokenize the batch."""
    texts = tok.apply_chat_template(batch["messages"], tokenize=False)
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids}


def _bench_format() -> Any:
    """``bench_chat``: a data format defined for this benchmark on our machinery."""
    import functools

    import attrs
    import datasets

    from qlora_plugins import DataFormat, DataOptions, DataSplits
    from qlora_plugins.data import Encoder, code_fingerprint, require_columns, split_examples, tokenize_cached

    @attrs.define
    class BenchChatOptions(DataOptions):
        messages_column: str = "messages"

    class BenchChat(DataFormat):
        name = "bench_chat"
        Options = BenchChatOptions
        tasks = ("causal_lm",)

        def load(self, context: Any) -> Any:
            o, tok = self.options, context.tokenizer
            path = Path(o.path)

            def prepare(rows: Any) -> Any:
                require_columns(rows, [o.messages_column], path, f"{context.config_path}.path")
                encode = functools.partial(_encode_chat, tok=tok, max_length=o.max_length)
                return Encoder(encode, features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}))

            data = tokenize_cached(
                [path],
                prepare,
                tokenizer=tok,
                name=self.name,
                options=o,
                code=code_fingerprint(_encode_chat),
                config_path=context.config_path,
                num_proc=o.num_proc,
                cache=o.cache,
            )
            train, evaluation = split_examples(data, None, o.eval_fraction, context.seed, ("input_ids",), {"labels": "input_ids"})
            return DataSplits(train, evaluation, rows=data.rows)

    return BenchChat


def _token_count(dataset: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py())


def worker_ours(spec: dict) -> dict:
    from transformers import AutoTokenizer

    from qlora_plugins import DataContext

    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    fmt_cls = _bench_format()
    fmt = fmt_cls(fmt_cls.Options(path=spec["file"], max_length=spec["max_length"], num_proc=spec["num_proc"], eval_fraction=0.01))
    loaded = time.perf_counter()
    splits = fmt.load(DataContext(tok, "causal_lm", 0, Path(spec["file"]).parent, "data"))
    done = time.perf_counter()
    first = splits.train[0]
    tokenized = splits.train.tokenized
    assert first["labels"] == first["input_ids"]
    return {
        "rows": splits.rows,
        "examples": len(splits.train) + len(splits.eval),
        "tokens": _token_count(tokenized.dataset),
        "cache_hit": tokenized.hit,
        "row0_tokens": len(tokenized.dataset[0]["input_ids"]),
        "train_is_arrow_backed": bool(tokenized.dataset.cache_files),
        "imports_and_tokenizer_s": round(loaded - started, 2),
        "prepare_s": round(done - loaded, 2),
        "sample_ids": list(tokenized.dataset[0]["input_ids"][:16]),
    }


def worker_trl(spec: dict) -> dict:
    import datasets
    import trl
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=spec["max_length"],
    )
    model = LlamaForCausalLM(config)
    loaded = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=spec["file"], split="train")
    read = time.perf_counter()
    args = SFTConfig(
        output_dir=str(Path(spec["scratch"]) / "trl-out"),
        max_length=spec["max_length"],
        dataset_num_proc=spec["num_proc"],
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=1,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    done = time.perf_counter()
    prepared = trainer.train_dataset
    first = prepared[0]
    return {
        "trl_version": trl.__version__,
        "rows": len(ds),
        "examples": len(prepared),
        "tokens": _token_count(prepared),
        "columns": list(prepared.column_names),
        "row0_tokens": len(first["input_ids"]),
        "imports_model_tokenizer_s": round(loaded - started, 2),
        "load_dataset_s": round(read - loaded, 2),
        "sft_trainer_init_s": round(done - read, 2),
        "prepare_s": round(done - loaded, 2),
        "sample_ids": list(first["input_ids"][:16]),
    }


# --- measuring --------------------------------------------------------------------------------


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            tree.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return tree


def _tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous PSS) in bytes, summed over ``root`` and its descendants."""
    tree, todo, rss, pss, anon = _children_of(), [root], 0, 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss", "Pss_Anon"):
                        value = int(rest.split()[0]) * 1024
                        rss += value if key == "Rss" else 0
                        pss += value if key == "Pss" else 0
                        anon += value if key == "Pss_Anon" else 0
        except (OSError, ValueError):
            continue
    return rss, pss, anon


def measure(name: str, spec: dict, env: dict) -> dict:
    """Run one contender in a fresh process; wall time, peak memory and its own report."""
    out = Path(spec["scratch"]) / f"{name}.result.json"
    out.unlink(missing_ok=True)
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import data_scale; data_scale.worker_main({json.dumps({**spec, 'worker': name, 'out': str(out)})!r})"
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log_path = Path(spec["scratch"]) / f"{name}.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: a chatty contender never blocks on a full pipe
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        peak = (0, 0, 0)
        while proc.poll() is None:
            sample = _tree_memory(proc.pid)
            peak = tuple(max(a, b) for a, b in zip(peak, sample))  # type: ignore[assignment]
            time.sleep(0.5)
    wall = time.perf_counter() - started
    log = log_path.read_text(errors="replace")
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}", "log_tail": log[-3000:]}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_tree_mb": round(peak[0] / 2**20, 1),
        "peak_pss_tree_mb": round(peak[1] / 2**20, 1),
        "peak_anon_pss_tree_mb": round(peak[2] / 2**20, 1),
        **json.loads(out.read_text()),
    }


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = worker_ours(spec) if spec["worker"].startswith("ours") else worker_trl(spec)
    result["worker_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["worker_children_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    Path(spec["out"]).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=None, help="workers for both (default: the usable cores)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-data-scale"))
    parser.add_argument("--output", type=Path, default=HERE / "results" / "data_scale.json")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="run only ours_cached, on the cache an earlier run of the same size left in --workdir (a rerun at another load)",
    )
    args = parser.parse_args()

    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    data = workdir / f"chat-{args.conversations}.jsonl"
    info = generate(data, args.conversations)
    tokenizer = build_tokenizer(workdir / "tokenizer")
    num_proc = args.num_proc or len(os.sched_getaffinity(0))
    scratch = workdir / "scratch"
    if not args.cached_only:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(exist_ok=True)
    spec = {"file": str(data), "tokenizer": str(tokenizer), "max_length": args.max_length, "num_proc": num_proc, "scratch": str(scratch)}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "HF_"))}
    base.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)})
    ours_env = {**base, "QLORA_PLUGINS_HOME": str(scratch / "qhome"), "HF_HOME": str(scratch / "hf-ours")}
    results: dict[str, Any] = {}
    loads: dict[str, list] = {}
    if not args.cached_only:
        results["ours"] = measure("ours", spec, ours_env)
        loads["ours"] = list(os.getloadavg())
    if not args.skip_trl and not args.cached_only:
        results["trl"] = measure("trl", spec, {**base, "HF_HOME": str(scratch / "hf-trl")})
        loads["trl"] = list(os.getloadavg())
    results["ours_cached"] = measure("ours_cached", spec, ours_env)
    loads["ours_cached"] = list(os.getloadavg())
    report: dict[str, Any] = {
        "benchmark": "data_scale",
        "what": "prepare a synthetic chat jsonl for training: ours (tokenize_cached, memory-mapped Arrow, cache) vs TRL SFTTrainer dataset preparation",
        "our_side": "a chat format defined in benchmarks/data_scale.py (tokenizer.apply_chat_template per conversation, batched "
        "tokenization, truncation to max_length, every token trained) on qlora_plugins.data.tokenize_cached; the builtin "
        "'chat' format is built on another branch",
        "data": {"file": str(data), **info},
        "tokenizer": "byte-level BPE, vocabulary 4096, trained offline on the generator's sentence pool; ChatML template",
        "max_length": args.max_length,
        "num_proc": num_proc,
        "cpus": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after_each": loads,
        "machine_note": "shared 2-core machine, busy with other engineers' work: figures vary with the load",
        "results": results,
    }
    ours, trl, cached = results.get("ours", {}), results.get("trl", {}), results.get("ours_cached", {})
    if "wall_s" in ours and "wall_s" in trl:
        report["ratios"] = {
            "time_ours_over_trl": round(ours["wall_s"] / trl["wall_s"], 3),
            "peak_pss_ours_over_trl": round(ours["peak_pss_tree_mb"] / trl["peak_pss_tree_mb"], 3),
            "peak_rss_ours_over_trl": round(ours["peak_rss_tree_mb"] / trl["peak_rss_tree_mb"], 3),
            "same_token_count": ours.get("tokens") == trl.get("tokens"),
            "same_first_tokens": ours.get("sample_ids") == trl.get("sample_ids"),
        }
    targets: dict[str, bool] = {}
    if "wall_s" in ours and "wall_s" in trl:
        targets["time_at_most_trl"] = ours["wall_s"] <= trl["wall_s"]
        targets["cpu_time_at_most_trl"] = ours["cpu_s"] <= trl["cpu_s"]
        targets["peak_memory_at_most_trl"] = ours["peak_pss_tree_mb"] <= trl["peak_pss_tree_mb"]
    if "wall_s" in cached:
        targets["cached_run_under_10_s"] = cached["wall_s"] < 10
    if targets:
        report["targets"] = targets
    text = json.dumps(report, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
