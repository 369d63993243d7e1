"""Packing tokenized examples into full sequences (``data.packing: true``).

:func:`pack_examples` places examples into bins of ``max_length`` tokens with best-fit
decreasing (deterministic: ties in length are broken by a permutation seeded with the run's
seed) and concatenates each bin into one *pack*: ``input_ids``, ``labels``, ``position_ids``
restarting at 0 for every example, and ``seq_lens``. The first label of every example is masked
(-100), so no token is ever predicted from the previous example's last token; unpacked, that
label is never used either (causal LM labels are shifted by one), so a pack trains exactly the
tokens its examples train alone.

Attention must not cross example boundaries. :func:`collate_packed` right-pads packs into a
batch with a 4-D additive block-diagonal causal mask (``(batch, 1, length, length)``, 0 where a
query may attend, the dtype's minimum elsewhere), which transformers passes to SDPA and eager
attention as it is; :func:`collate_varlen` puts a micro-batch's packs into one row without
padding and without a mask, for flash-attention, whose variable-length kernel finds the example
boundaries (``cu_seqlens``) from the restarting ``position_ids``. :func:`packed_attention`
chooses between the two for a model.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Sequence

import attrs

IGNORE_INDEX = -100


@attrs.define
class PackingStats:
    """What packing did: examples in, packs out, tokens, and how full the packs are.

    :param fill: tokens / (packs * max_length), the share of the packed sequences that is not
        padding.
    :param longest: the longest example (an example longer than ``max_length`` gets a pack of
        its own).
    """

    examples: int
    packs: int
    tokens: int
    max_length: int
    fill: float
    longest: int

    def to_dict(self) -> dict:
        """The stats as a plain mapping (what the run report records)."""
        return attrs.asdict(self)


def best_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most ``capacity``: examples in decreasing
    length (equal lengths in an order seeded with ``seed``), each into the fullest bin it still
    fits in, or a new bin. A length over ``capacity`` gets a bin of its own. Runs in
    ``O(n log n + n * distinct free spaces)``."""
    ranks = list(range(len(lengths)))
    random.Random(seed).shuffle(ranks)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], ranks[i]))
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with that much free (oldest first)
    spaces: list[int] = []  # the free spaces that have bins, sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(spaces, n)
        if at == len(spaces):
            bins.append([i])
            free = capacity - n
            if free <= 0:
                continue
            target = len(bins) - 1
        else:
            space = spaces[at]
            queue = by_space[space]
            target = queue.pop(0)
            if not queue:
                del by_space[space]
                spaces.pop(at)
            bins[target].append(i)
            free = space - n
            if free == 0:
                continue
        if free not in by_space:
            by_space[free] = []
            bisect.insort(spaces, free)
        by_space[free].append(target)
    return bins


def pack_examples(examples: Sequence[dict], max_length: int, seed: int = 0) -> tuple[list[dict], PackingStats]:
    """Pack ``examples`` (``input_ids`` and ``labels``, -100 = masked) into sequences of at most
    ``max_length`` tokens; returns the packs (``input_ids``, ``labels``, ``position_ids``,
    ``seq_lens``) in bin order and their :class:`PackingStats`."""
    lengths = [len(e["input_ids"]) for e in examples]
    packs = []
    for members in best_fit_decreasing(lengths, max_length, seed):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        for i in members:
            example = examples[i]
            n = lengths[i]
            ids.extend(example["input_ids"])
            example_labels = list(example["labels"])
            if len(example_labels) != n:
                raise ValueError(f"example {i}: {len(example_labels)} labels for {n} tokens")
            if example_labels:
                example_labels[0] = IGNORE_INDEX  # never predicted from the previous example's last token
            labels.extend(example_labels)
            positions.extend(range(n))
            seq_lens.append(n)
        packs.append({"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lens": seq_lens})
    tokens = sum(lengths)
    stats = PackingStats(
        examples=len(examples),
        packs=len(packs),
        tokens=tokens,
        max_length=max_length,
        fill=round(tokens / (len(packs) * max_length), 4) if packs else 0.0,
        longest=max(lengths, default=0),
    )
    return packs, stats


def block_causal_mask(seq_lens_rows: Sequence[Sequence[int]], width: int, dtype: Any) -> Any:
    """The 4-D additive mask ``(rows, 1, width, width)``: 0 where a query may attend (an earlier
    or the same token of the same example), ``finfo(dtype).min`` elsewhere. Padding after a row's
    examples forms one more causal block, which no real token can see."""
    import torch

    segments = torch.empty((len(seq_lens_rows), width), dtype=torch.long)
    for row, seq_lens in enumerate(seq_lens_rows):
        lengths = [n for n in [*seq_lens, width - sum(seq_lens)] if n > 0]
        segments[row] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate_packed(packs: Sequence[dict], pad_id: int, dtype: Any) -> dict:
    """Right-pad packs into a batch: ``input_ids``, ``labels`` (-100 on padding),
    ``position_ids`` (restarting per example; padding counts on as a block of its own) and the
    4-D block-diagonal causal ``attention_mask`` of :func:`block_causal_mask` in ``dtype`` (the
    model's compute dtype)."""
    import torch

    width = max(len(p["input_ids"]) for p in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    for i, p in enumerate(packs):
        n = len(p["input_ids"])
        ids[i, :n] = torch.tensor(p["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(p["labels"], dtype=torch.long)
        positions[i, :n] = torch.tensor(p["position_ids"], dtype=torch.long)
        positions[i, n:] = torch.arange(width - n)
    mask = block_causal_mask([p["seq_lens"] for p in packs], width, dtype)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}


def collate_varlen(packs: Sequence[dict]) -> dict:
    """A micro-batch's packs as one row without padding (``(1, total tokens)``) and without an
    attention mask: ``position_ids`` restart at every example, which is how transformers'
    flash-attention integration finds the boundaries (``cu_seqlens``) for the
    variable-length kernel."""
    import torch

    ids = [t for p in packs for t in p["input_ids"]]
    labels = [t for p in packs for t in p["labels"]]
    positions = [t for p in packs for t in p["position_ids"]]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def trained_tokens(batch: dict, task: str) -> int:
    """Positions whose loss a batch trains: shifted causal LM labels that are not -100, or the
    examples of a classification batch."""
    labels = batch["labels"]
    if task == "seq_cls":
        return int(labels.shape[0])
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def compute_dtype(model: Any) -> Any:
    """The dtype a model computes attention in (that of its input embeddings)."""
    import torch

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


def packed_attention(model: Any, device: str) -> str:
    """``varlen`` when the model runs a flash-attention implementation on CUDA (it is switched
    to ``flash_attention_2`` when the ``flash_attn`` package is installed and the model supports
    it), else ``mask`` (a 4-D block-diagonal mask for SDPA and eager attention)."""
    if device != "cuda" or str(compute_dtype(model)) not in ("torch.bfloat16", "torch.float16"):
        return "mask"  # flash-attention kernels run in 16 bits only
    config = getattr(model, "config", None)
    current = str(getattr(config, "_attn_implementation", "") or "")
    if "flash" in current:
        return "varlen"
    try:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return "mask"
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation("flash_attention_2")
    except Exception:  # an architecture without flash-attention support keeps the exact mask path
        return "mask"
    return "varlen"
