"""Per-row cost of the ``chat`` format's masking against transformers' ``{% generation %}`` path.

Ours: ``ChatEncoder.encode`` (render the conversation and, per assistant turn, its prompt and its
closing, one tokenization, spans mapped to tokens). Anchor: ``apply_chat_template(...,
tokenize=True, return_assistant_tokens_mask=True)`` with the same ChatML template carrying
``{% generation %}`` markers (what TRL's ``assistant_only_loss`` relies on). Both on the
conversations of ``examples/data/chat.jsonl`` with tiny-llama-chat's tokenizer, one thread,
interleaved rounds; the masks are compared token by token.

    python benchmarks/chat_encode.py [--rounds 5] [--rows 2000]

Prints one JSON object and writes it to benchmarks/results/chat_encode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TAGGED_CHATML = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' -%}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}{{ m['content'] + '<|im_end|>' }}{%- endif -%}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tokenizers
    import transformers

    from qlora_plugins.builtin_plugins.data_chat import ChatEncoder, special_stops
    from qlora_plugins.builtin_plugins.model_sources import chat_tokenizer

    tok = chat_tokenizer()
    lines = (ROOT / "examples" / "data" / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line)["messages"] for line in lines if line.strip()]
    rows = (rows * (args.rows // len(rows) + 1))[: args.rows]
    ours = ChatEncoder(tok, tok.chat_template, "chatml", special_stops(tok), "assistant", 1_000_000)

    def run_ours() -> list:
        return [ours.encode(m)["labels"] for m in rows]

    def run_anchor() -> list:
        out = []
        for m in rows:
            enc = tok.apply_chat_template(
                m, chat_template=TAGGED_CHATML, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = enc["input_ids"], enc["assistant_masks"]
            out.append([i if keep else -100 for i, keep in zip(ids, mask)])
        return out

    a, b = run_ours(), run_anchor()  # warm-up, and the agreement check
    differing_rows = sum(1 for x, y in zip(a, b) if x != y)
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("anchor", run_anchor)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "chat_encode",
        "rows": len(rows),
        "rounds": args.rounds,
        "ours_rows_per_s": round(len(rows) / med["ours"], 1),
        "anchor_rows_per_s": round(len(rows) / med["anchor"], 1),
        "ours_over_anchor_time": round(med["ours"] / med["anchor"], 3),
        "rows_with_different_masks": differing_rows,
        "trained_tokens": sum(sum(1 for x in labels if x != -100) for labels in a),
        "loadavg": os.getloadavg(),
        "threads": 1,
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "note": "the machine is shared: compare the ratio, measured in the same run (interleaved rounds)",
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = ROOT / "benchmarks" / "results" / "chat_encode.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
