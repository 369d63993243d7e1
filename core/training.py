"""The training loop: plain PyTorch with transformers' schedulers.

Deterministic given the seed: batches come from a per-epoch seeded permutation, so the position in
the data is just (epoch, batch index) and a run can be resumed exactly. The items batched are the
examples, or the packs of ``data.packing`` (core/packing.py) with their own collator.

Gradient accumulation normalizes by the trained tokens of the whole optimizer step: each
micro-batch contributes its *summed* token loss divided by the trained tokens of all the step's
micro-batches (counted before the first forward), so 4 micro-batches of 2 examples give the
gradient of one batch of 8 however the trained tokens are spread over them (averaging per-batch
means would weight a token of a short micro-batch more; transformers#34191). The loss recorded
for a step is therefore the per-token mean over the step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, Sequence

import attrs

from qlora_plugins.core.errors import TrainingError
from qlora_plugins.core.packing import trained_tokens

IGNORE_INDEX = -100


@attrs.define
class TrainState:
    """Where training stands: optimizer steps done and the data position."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def collate(examples: Sequence[dict], pad_id: int, task: str) -> dict:
    """Right-pad a list of examples into tensors (labels -100 where padded)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "seq_cls":
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch (a seeded permutation)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch (the last partial batch is kept)."""
    return math.ceil(n / batch_size)


def iterate_batches(data: Sequence[dict], batch_size: int, seed: int, state: TrainState) -> Iterator[list[dict]]:
    """Endless batches starting at ``state``'s data position, advancing it as they are taken."""
    per_epoch = batches_per_epoch(len(data), batch_size)
    while True:
        order = epoch_order(len(data), seed, state.epoch)
        while state.batch_in_epoch < per_epoch:
            start = state.batch_in_epoch * batch_size
            idx = order[start : start + batch_size]
            state.batch_in_epoch += 1
            yield [data[i] for i in idx]
        state.epoch += 1
        state.batch_in_epoch = 0


def total_steps(train_cfg: Any, n_train: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` worth of batches."""
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    micro = batches_per_epoch(n_train, train_cfg.batch_size) * train_cfg.epochs
    return max(1, math.ceil(micro / train_cfg.gradient_accumulation_steps))


def trainable_parameters(model: Any) -> list:
    """Parameters that require grad."""
    return [p for p in model.parameters() if p.requires_grad]


def prepare_for_kbit_training(model: Any, gradient_checkpointing: bool) -> None:
    """Freeze the base, turn on gradient checkpointing (non-reentrant, so inputs need no grad)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False


def move_batch(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def summed_token_loss(logits: Any, labels: Any) -> Any:
    """The causal LM cross-entropy summed (not averaged) over the trained positions: the logits
    at position t predict ``labels[t + 1]``; labels -100 are not trained. Computed in fp32."""
    import torch.nn.functional as F

    # shift the labels, not the logits: a slice of the logits would be copied by the reshape
    targets = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def step_loss(model: Any, batch: dict, task: str) -> Any:
    """The loss of one micro-batch summed over what it trains (tokens for a causal LM, examples
    for classification), for the caller to divide by the step's total."""
    if task == "seq_cls":
        return model(**batch).loss * batch["labels"].shape[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return summed_token_loss(model(**inputs).logits, batch["labels"])


def evaluate(
    model: Any, data: Sequence[dict], batch_size: int, pad_id: int, task: str, device: str, max_batches: int | None = None
) -> dict:
    """Mean loss (and accuracy for classification) over ``data``."""
    import torch

    if not data:
        return {}
    was_training = model.training
    model.eval()
    total_loss, total_weight, correct, seen = 0.0, 0, 0, 0
    from qlora_plugins.core.progress import advance

    with torch.no_grad():
        for b, start in enumerate(range(0, len(data), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            advance(1)
            batch = move_batch(collate(data[start : start + batch_size], pad_id, task), device)
            out = model(**batch)
            if task == "seq_cls":
                weight = batch["labels"].numel()
                correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
                seen += weight
            else:
                weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())
            total_loss += out.loss.item() * weight
            total_weight += weight
    model.train(was_training)
    result = {"eval_loss": total_loss / max(total_weight, 1)}
    if task == "seq_cls":
        result["eval_accuracy"] = correct / max(seen, 1)
    return result


@attrs.define
class TrainResult:
    """Figures of a finished training loop."""

    steps: int
    step_times: list
    first_loss: float | None
    last_loss: float | None
    eval: dict


class TrainLoop:
    """Runs optimizer steps over a prepared model; callbacks get each metrics record.

    :param on_record: called with every metrics record (train steps and evals).
    :param on_step_end: called with the state after each optimizer step (checkpointing).
    :param collate_fn: turns the items of ``train_data`` taken for a micro-batch into model
        inputs with ``labels`` (default: :func:`collate`; packs use core/packing.py's).
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        train_cfg: Any,
        train_data: Sequence[dict],
        eval_data: Sequence[dict],
        pad_id: int,
        task: str,
        device: str,
        total: int,
        state: TrainState | None = None,
        on_record: Callable[[dict], None] = lambda r: None,
        on_step_end: Callable[[TrainState], None] = lambda s: None,
        on_interrupt: Callable[[TrainState], None] = lambda s: None,
        progress: Any = None,
        collate_fn: Callable[[list[dict]], dict] | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, train_cfg
        self.train_data, self.eval_data = train_data, eval_data
        self.pad_id, self.task, self.device, self.total = pad_id, task, device, total
        self.state = state or TrainState()
        self.on_record, self.on_step_end, self.on_interrupt, self.progress = on_record, on_step_end, on_interrupt, progress
        self.collate_fn = collate_fn or (lambda items: collate(items, pad_id, task))

    def _eval(self) -> dict:
        from qlora_plugins.core.progress import current

        batches = batches_per_epoch(len(self.eval_data), self.cfg.batch_size) if self.eval_data else 0
        if self.cfg.eval_max_batches is not None:
            batches = min(batches, self.cfg.eval_max_batches)
        with current().stage("eval", total=batches, unit="batch") as stage:
            figures = evaluate(
                self.model, self.eval_data, self.cfg.batch_size, self.pad_id, self.task, self.device, self.cfg.eval_max_batches
            )
            if "eval_loss" in figures:
                stage.set_postfix(loss=f"{figures['eval_loss']:.4f}")
        loss = figures.get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(
                f"eval loss became {loss} at step {self.state.step}; stopping (lower optimizer.lr, check the data); "
                "the last checkpoint is kept"
            )
        if figures:
            self.on_record({"step": self.state.step, **figures})
        return figures

    def run(self) -> TrainResult:
        """Train until ``total`` steps; a Ctrl-C anywhere calls ``on_interrupt`` with a consistent state."""
        params = trainable_parameters(self.model)
        batches = iterate_batches(self.train_data, self.cfg.batch_size, self.cfg.seed, self.state)
        self.model.train()
        step_times: list[float] = []
        self._interrupt_handled = False
        try:
            figures = self._loop(batches, params, step_times)
        except KeyboardInterrupt:  # outside a step (evaluation, logging, saving): the state is a completed step
            if not self._interrupt_handled:
                self.on_interrupt(self.state)
            raise
        return TrainResult(self.state.step, step_times, self._first_loss, self._last_loss, figures)

    def _loop(self, batches: Iterator[list[dict]], params: list, step_times: list) -> dict:
        import torch

        cfg = self.cfg
        self._first_loss = self._last_loss = None
        while self.state.step < self.total:
            started = time.perf_counter()
            # where this step starts: restored if Ctrl-C lands mid-step, so the saved state is exact
            snapshot = (self.state.epoch, self.state.batch_in_epoch, torch.get_rng_state())
            try:
                lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
                loss_total, tokens, trained, grad_norm = self._step(batches, params)
            except KeyboardInterrupt:
                self.state.epoch, self.state.batch_in_epoch = snapshot[0], snapshot[1]
                torch.set_rng_state(snapshot[2])
                self.optimizer.zero_grad(set_to_none=True)
                self._interrupt_handled = True
                self.on_interrupt(self.state)
                raise
            elapsed = time.perf_counter() - started
            step_times.append(elapsed)
            if loss_total is not None:
                self._first_loss = loss_total if self._first_loss is None else self._first_loss
                self._last_loss = loss_total
            if self.state.step % cfg.log_every == 0 or self.state.step == self.total:
                record = {
                    "step": self.state.step,
                    "loss": loss_total,
                    "lr": lr,
                    "step_time_s": round(elapsed, 5),
                    "tokens": tokens,
                    "trained_tokens": trained,
                    "epoch": self.state.epoch,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self.on_record(record)
            if self.progress is not None:
                self.progress.update(1)
                if loss_total is not None:
                    self.progress.set_postfix(loss=f"{loss_total:.4f}")
            if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.state.step < self.total:
                self._eval()
            self.on_step_end(self.state)
        return self._eval()

    def _step(self, batches: Iterator[list[dict]], params: list) -> tuple[float | None, int, int, float | None]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, normalized by
        the trained tokens of all of them; returns (loss, input tokens, trained tokens, grad norm)."""
        import torch

        cfg = self.cfg
        micro, tokens = [], 0
        for _ in range(cfg.gradient_accumulation_steps):
            items = next(batches)
            tokens += sum(len(item["input_ids"]) for item in items)
            batch = self.collate_fn(items)
            micro.append((batch, trained_tokens(batch, self.task)))
        total = sum(count for _, count in micro)
        loss_total: float | None = 0.0 if total else None
        for batch, count in micro:
            if count == 0:  # nothing to learn from (every label masked): no forward, no gradient
                continue
            loss = step_loss(self.model, move_batch(batch, self.device), self.task) / total
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {self.state.step + 1}; "
                    "stopping (lower optimizer.lr, check the data); the last checkpoint is kept"
                )
            loss.backward()
            loss_total = (loss_total or 0.0) + loss.item()
        return loss_total, tokens, total, self._update(params, total)

    def _update(self, params: list, trained: float) -> float | None:
        """The end of an optimizer step whose gradients are in: clip (when configured and the
        step trained anything), step the optimizer and the scheduler, clear the gradients, count
        the step. Returns the gradient norm before clipping, or None."""
        import torch

        grad_norm = None
        if self.cfg.max_grad_norm is not None and trained:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm
