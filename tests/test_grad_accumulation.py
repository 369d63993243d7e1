"""Gradient accumulation normalizes by the trained tokens of the whole optimizer step
(transformers#34191): the training loop's 4 micro-batches of 2 examples give the gradient of one
batch of 8, packed or not, although the micro-batches hold very different numbers of trained
tokens (averaging per-micro-batch means would not: the control shows by how much). The loss the
loop records is the per-token mean over the step."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import yaml

from qlora_plugins.api import Pipeline, TrainLoop, load_config
from qlora_plugins.data import collate, pack_examples, trained_tokens
from qlora_plugins.testing import make_registry


class RecordingOptimizer:
    """Stands in for the optimizer: keeps the gradients of each step and changes no weight."""

    def __init__(self, params: list) -> None:
        self.params, self.steps = params, []

    def step(self) -> None:
        self.steps.append([p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class ConstantSchedule:
    def get_last_lr(self) -> list:
        return [0.0]

    def step(self) -> None:
        pass


def rows() -> list[dict]:
    """8 rows whose responses range from 1 to 60 characters, so micro-batches of 2 differ a lot
    in trained tokens."""
    lengths = [1, 60, 3, 45, 2, 30, 8, 52]
    return [{"instruction": "Say it.", "input": str(i), "output": ("abcdefghij" * 6)[:n]} for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulation")
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    config = {
        "model": {"source": "tiny-llama"},
        "quantizer": {"name": "nf4"},
        "adapter": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "name": "instruction",
            "path": str(data),
            "max_length": 128,
            "eval_fraction": 0.0,
            "template": "{instruction}{input_block}\n",
        },
        "train": {"max_steps": 1, "batch_size": 8, "seed": 5, "max_grad_norm": None, "gradient_checkpointing": False, "threads": 1},
        "export": [],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    pipeline = Pipeline(load_config(path), make_registry(), tmp / "run", progress=False)
    prepared = pipeline.prepare(pipeline.check())
    attached = pipeline.attach(prepared, pipeline.load(prepared))
    return prepared, attached


def one_step(stages, batch_size: int, accumulation: int, train_data=None, collate_fn=None):
    """The loop's gradient and recorded loss of its first optimizer step."""
    prepared, attached = stages
    cfg = attrs.evolve(prepared.checked.config.train, batch_size=batch_size, gradient_accumulation_steps=accumulation, eval_every=None)
    optimizer = RecordingOptimizer(attached.params)
    records: list[dict] = []
    TrainLoop(
        attached.model,
        optimizer,
        ConstantSchedule(),
        cfg,
        train_data if train_data is not None else prepared.splits.train,
        [],
        prepared.tokenizer.pad_token_id,
        "causal_lm",
        "cpu",
        1,
        on_record=records.append,
        collate_fn=collate_fn,
    ).run()
    return optimizer.steps[0], records[0]


def max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_four_micro_batches_of_two_give_the_gradient_of_one_batch_of_eight(stages, capsys):
    prepared, _ = stages
    examples = prepared.splits.train
    assert len(examples) == 8
    per_pair = [trained_tokens(collate(examples[i : i + 2], 0, "causal_lm"), "causal_lm") for i in range(0, 8, 2)]
    whole, whole_record = one_step(stages, 8, 1)
    split, split_record = one_step(stages, 2, 4)
    scale = max(float(g.abs().max()) for g in whole)
    with capsys.disabled():
        print(f"\n4 x 2 vs 1 x 8 (trained tokens per pair {per_pair}): max |dgrad| {max_diff(whole, split):.2e} (max |grad| {scale:.2e})")
    assert max_diff(whole, split) < 1e-6 * max(1.0, scale) * 10
    assert split_record["trained_tokens"] == whole_record["trained_tokens"] == sum(per_pair)
    assert split_record["loss"] == pytest.approx(whole_record["loss"], rel=1e-6)  # the per-token mean of the step


def test_averaging_micro_batch_means_would_be_wrong(stages, capsys):
    """The control: dividing each micro-batch's mean loss by 4 (the old way) weights the tokens
    of a short micro-batch more, and the gradient is measurably different."""
    from qlora_plugins.api import step_loss

    prepared, attached = stages
    model, examples = attached.model, prepared.splits.train
    whole, _ = one_step(stages, 8, 1)
    # the loop takes the examples in its seeded order; any split into pairs shows the effect
    model.zero_grad(set_to_none=True)
    for i in range(0, 8, 2):
        batch = collate(examples[i : i + 2], prepared.tokenizer.pad_token_id, "causal_lm")
        (step_loss(model, batch, "causal_lm") / trained_tokens(batch, "causal_lm") / 4).backward()
    naive = [p.grad.detach().clone() for p in attached.params]
    model.zero_grad(set_to_none=True)
    with capsys.disabled():
        print(f"\nmean of micro-batch means vs 1 x 8: max |dgrad| {max_diff(whole, naive):.2e}")
    assert max_diff(whole, naive) > 100 * max_diff(whole, one_step(stages, 2, 4)[0])


def test_accumulation_over_packed_micro_batches(stages):
    """The same holds for packs: 2 micro-batches of 1 pack give the gradient of one batch of
    2 packs, and both the gradient of the 8 examples unpacked."""
    import torch

    from qlora_plugins.data import collate_packed

    prepared, _ = stages
    packs, stats = pack_examples(prepared.splits.train, 128, seed=5)
    assert stats.packs >= 2
    collate_fn = lambda items: collate_packed(items, prepared.tokenizer.pad_token_id, torch.float32)  # noqa: E731
    whole, _ = one_step(stages, len(packs), 1, packs, collate_fn)
    split, _ = one_step(stages, 1, len(packs), packs, collate_fn)
    unpacked, _ = one_step(stages, 8, 1)
    assert max_diff(whole, split) < 1e-6
    assert max_diff(whole, unpacked) < 1e-6


def test_recorded_loss_is_the_token_mean_of_a_real_run(tmp_path: Path):
    """Through the CLI: a run with accumulation records, per step, the trained tokens of all its
    micro-batches and a finite loss."""
    from qlora_plugins.testing import run_cli

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    config = {
        "model": {"source": "tiny-llama"},
        "adapter": {"name": "lora", "r": 4},
        "optimizer": {"name": "adamw"},
        "data": {"name": "instruction", "path": str(data), "max_length": 128, "eval_fraction": 0.0},
        "train": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 2, "seed": 1, "threads": 1},
        "export": [],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_cli("run", path, "--output", tmp_path / "run", "--no-progress", registry=make_registry())
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # each step trains 4 of the 8 examples: together the two steps train every response token once
    examples_trained = sum(r["trained_tokens"] for r in steps)
    per_example = [len(r["output"]) + 1 for r in rows()]  # byte tokens of the response, plus EOS
    assert examples_trained == sum(per_example)
    assert all(0 < r["loss"] < 20 for r in steps)
