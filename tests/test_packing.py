"""Packing (``data.packing: true``): the bin packer, the packs' labels and positions, and the
proof that a packed batch trains exactly what its examples train unpacked: the loss and the
adapter gradients agree to float precision for the Llama and GPT-2 families (GPT-2's learned
absolute positions need the restarted position_ids), while leaving out the block-diagonal mask
or the restarted positions changes them. Also the variable-length layout for flash-attention,
the run through the CLI and the refused combinations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from qlora_plugins.api import Pipeline, load_config, step_loss
from qlora_plugins.data import (
    IGNORE_INDEX,
    best_fit_decreasing,
    collate,
    collate_packed,
    collate_varlen,
    pack_examples,
    trained_tokens,
)
from qlora_plugins.testing import make_registry, run_cli

WORDS = "apple river stone cloud lamp tiger maple ocean violet copper lantern meadow".split()


def varied_rows(n: int = 14, seed: int = 0) -> list[dict]:
    """Instruction rows whose responses vary from one word to nine (examples of 30-90 tokens)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(1 + (i * 5) % 9)]
        rows.append({"instruction": f"Repeat {len(words)} words.", "input": words[0], "output": " ".join(words)})
    return rows


def write_run_config(tmp_path: Path, source: str = "tiny-llama", rows: list[dict] | None = None, **data) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or varied_rows())), encoding="utf-8")
    config = {
        "model": {"source": source},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "data": {
            "name": "instruction",
            "path": str(path),
            "max_length": 128,
            "eval_fraction": 0.0,
            "template": "Q: {instruction}\n{input_block}A: ",
            "input_template": "{input}\n",
            **data,
        },
        "train": {"max_steps": 2, "batch_size": 4, "seed": 0, "threads": 1, "max_grad_norm": None, "gradient_checkpointing": False},
        "export": [],
    }
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(config), encoding="utf-8")
    return out


def model_and_data(tmp_path: Path, source: str):
    """The run's stages up to the attached adapter: the QLoRA model (nf4 base + LoRA) and the
    tokenized training examples."""
    pipeline = Pipeline(load_config(write_run_config(tmp_path, source)), make_registry(), tmp_path / "run", progress=False)
    prepared = pipeline.prepare(pipeline.check())
    attached = pipeline.attach(prepared, pipeline.load(prepared))
    return attached.model, list(prepared.splits.train), prepared.tokenizer.pad_token_id


def loss_and_grads(model, batch: dict, total: int) -> tuple[float, dict]:
    import torch

    model.zero_grad(set_to_none=True)
    loss = step_loss(model, batch, "causal_lm") / total
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    return loss.item(), grads


def max_grad_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# --- the packer ------------------------------------------------------------------------------


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1, (len(bins), lower_bound)  # BFD is near-optimal here
    assert bins == best_fit_decreasing(lengths, 128, seed=3)  # deterministic given the seed


def test_best_fit_picks_the_fullest_bin_that_fits_and_isolates_overlong_examples():
    # 70 opens a bin (58 free), 60 another (68 free); 50 goes to the fuller one (58 free: 8 left)
    assert best_fit_decreasing([70, 60, 50], 128) == [[0, 2], [1]]
    assert best_fit_decreasing([200, 10], 128) == [[0], [1]]  # longer than a pack: alone


def test_packs_restart_positions_and_mask_each_examples_first_label():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [10, 11, 12, 13], "labels": [10, 11, 12, 13]},
    ]
    packs, stats = pack_examples(examples, max_length=8, seed=0)
    assert stats.examples == 3 and stats.packs == 2 and stats.tokens == 9 and stats.fill == round(9 / 16, 4)
    by_first = {p["input_ids"][0]: p for p in packs}
    both = by_first[10]  # 4 tokens, then the 3-token example fits (1 left), the 2-token one does not
    assert both["input_ids"] == [10, 11, 12, 13, 5, 6, 7]
    assert both["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    assert both["labels"] == [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX, 6, 7]
    assert both["seq_lens"] == [4, 3]
    # the same trained positions as the examples alone (whose first label is never used)
    unpacked = sum(trained_tokens(collate([e], 0, "causal_lm"), "causal_lm") for e in examples)
    assert trained_tokens(collate_packed(packs, 0, _float32()), "causal_lm") == unpacked == 6


def _float32():
    import torch

    return torch.float32


def test_block_causal_mask_lets_no_example_see_another():
    import torch

    batch = collate_packed([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 0], "seq_lens": [2, 1]}], 0, torch.float32)
    mask = batch["attention_mask"]
    assert mask.shape == (1, 1, 3, 3)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_varlen_rows_give_flash_attention_the_example_boundaries():
    """One row without padding; transformers derives flash-attention's cu_seqlens from the
    restarting position_ids, and they must be the packs' example boundaries."""
    fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
    examples = [{"input_ids": list(range(3 + n)), "labels": list(range(3 + n))} for n in (0, 4, 1, 6, 2)]
    packs, _ = pack_examples(examples, max_length=10, seed=0)
    batch = collate_varlen(packs)
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples)) and "attention_mask" not in batch
    (cu_q, _), (max_q, _) = fa.prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lens = [n for p in packs for n in p["seq_lens"]]
    expected = [0]
    for n in lens:
        expected.append(expected[-1] + n)
    assert cu_q.tolist() == expected and int(max_q) == max(lens)


# --- packed == unpacked -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tiny-llama", "tiny-gpt2"])
def test_packed_batch_has_the_loss_and_adapter_gradients_of_the_unpacked_examples(tmp_path, source, capsys):
    import torch

    model, examples, pad = model_and_data(tmp_path, source)
    packs, stats = pack_examples(examples, 128, seed=0)
    assert stats.packs <= len(examples) / 2  # the examples really share sequences
    unpacked = collate(examples, pad, "causal_lm")
    packed = collate_packed(packs, pad, torch.float32)
    total = trained_tokens(unpacked, "causal_lm")
    assert trained_tokens(packed, "causal_lm") == total

    loss_u, grads_u = loss_and_grads(model, unpacked, total)
    loss_p, grads_p = loss_and_grads(model, packed, total)
    loss_diff, grad_diff = abs(loss_u - loss_p), max_grad_diff(grads_u, grads_p)
    scale = max(float(g.abs().max()) for g in grads_u.values())
    with capsys.disabled():
        print(
            f"\n{source}: {len(examples)} examples in {stats.packs} packs; |dloss| {loss_diff:.2e}, max |dgrad| {grad_diff:.2e} (max |grad| {scale:.2e})"
        )
    assert loss_diff < 1e-5 and grad_diff < 1e-5 * max(1.0, scale)

    # the controls: attention across examples changes the result; so do positions that run on
    # through the pack for GPT-2's absolute positions (Llama's rotary positions are relative, so
    # within the block mask an offset changes nothing)
    controls = [("no block mask", {**packed, "attention_mask": torch.ones(packed["input_ids"].shape, dtype=torch.long)})]
    if source == "tiny-gpt2":
        controls.append(("no restarted positions", {k: v for k, v in packed.items() if k != "position_ids"}))
    for name, batch in controls:
        loss_x, grads_x = loss_and_grads(model, batch, total)
        assert abs(loss_x - loss_u) > 1e-3 or max_grad_diff(grads_x, grads_u) > 1e-3, name


# --- through the CLI ----------------------------------------------------------------------


@pytest.mark.slow
def test_run_with_packing_reports_the_packs(tmp_path):
    config = write_run_config(tmp_path, packing=True)
    result = run_cli("run", config, "--output", tmp_path / "run", "--no-progress", "--json", registry=make_registry())
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    packing = report["data"]["packing"]
    assert packing["examples"] == report["training"]["train_examples"] == 14
    assert packing["packs"] < 14 and 0.5 < packing["fill"] <= 1.0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["packing"] is True
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # batch_size counts packed sequences: 4 packs a step hold more than 4 examples' tokens
    assert all(r["trained_tokens"] > 0 and r["tokens"] > 4 * 40 for r in steps)


def test_packing_refused_for_classification(tmp_path):
    data = tmp_path / "labels.csv"
    data.write_text("text,label\nok,a\nbad,b\n", encoding="utf-8")
    config = {
        "model": {"source": "tiny-bert", "task": "seq_cls"},
        "data": {"name": "classification", "path": str(data), "packing": True},
        "train": {"max_steps": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_cli("run", path, "--output", tmp_path / "run", registry=make_registry())
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error:")
    assert "data.packing" in result.stderr and "seq_cls" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_packing_must_be_a_boolean(tmp_path):
    config = write_run_config(tmp_path, packing="yes please")
    result = run_cli("validate", config, registry=make_registry())
    assert result.exit_code == 2 and "data.packing: must be true or false" in result.stderr
