"""Pretrain a small Llama on ../shared/data/tinyshakespeare.txt so that quantization is measured on
trained weights, then (optionally) run `qlora quant-report` on it with the held-out 10% as probe.

    python benchmarks/pretrain_shakespeare.py --out /tmp/shakespeare-llama --steps 1500
    qlora quant-report /tmp/shakespeare-llama --text /tmp/shakespeare-llama/heldout.txt --double-quant --json

Prints one JSON object (training figures; the quant-report when --report is given).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--report", action="store_true", help="also run qlora quant-report (NF4+DQ, FP4, INT4) on the result")
    args = parser.parse_args()
    if not args.data.is_file():
        print(json.dumps({"error": f"{args.data} not found (it lives in the shared data folder)"}))
        sys.exit(2)

    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_plugins.builtin_plugins.model_sources import byte_level_tokenizer

    lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    train_text, heldout_text = "".join(lines[:cut]), "".join(lines[cut:])
    tok = byte_level_tokenizer()
    ids = torch.tensor(tok(train_text, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    started, losses = time.perf_counter(), []
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch,), generator=g)
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    tok.save_pretrained(str(args.out))
    (args.out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    result = {
        "model": str(args.out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "final_train_loss": sum(losses[-50:]) / min(50, len(losses)),
        "train_perplexity": math.exp(sum(losses[-50:]) / min(50, len(losses))),
        "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    if args.report:
        reports = {}
        for dq in ("--double-quant", "--no-double-quant"):
            out = subprocess.run(
                ["qlora", "quant-report", str(args.out), "--text", str(args.out / "heldout.txt"), dq, "--json", "--max-tokens", "16384"],
                capture_output=True,
                text=True,
                check=True,
            )
            reports[dq.strip("-")] = json.loads(out.stdout)
        result["quant_report"] = reports
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
