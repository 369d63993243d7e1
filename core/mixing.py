"""Host-level options of the ``data`` section (``packing``, ``sources``) and the mixing of
several data files (``data.sources``).

Every data format accepts these keys because the host takes them out of the ``data`` section
before the format's own options are built: a data format never sees them (so a format cannot
have options of these names).

``data.sources: [{path, weight, <format options>}]`` loads each file with the section's data
format, the section's options overridden by the source's own, and mixes the training splits:

- without weights, the sources are concatenated;
- with a weight on every source, source *i* gets ``round(N * w_i / sum(w))`` of the
  ``N`` training examples the sources have together (largest-remainder rounding, so the counts
  add up to ``N``): a source with fewer is repeated (every example the same number of times,
  then a seeded sample of the rest), one with more is subsampled (a seeded sample, without
  replacement). The seed is the run's ``train.seed``.

The evaluation splits are concatenated, never weighted. :class:`MixedSources` reports each
source's share of the training examples and tokens in ``DataSplits.sources``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import attrs

from qlora_plugins.core.errors import ConfigError, short_repr
from qlora_plugins.core.interfaces import DataContext, DataFormat, DataSplits

#: Keys of the ``data`` section the host reads itself; the data format's options never see them.
HOST_KEYS = ("packing", "sources")
#: Keys a source may not set: the format is the section's, ``max_length`` is shared (packs have
#: one length), and the host keys are the section's.
SOURCE_FORBIDDEN = {
    "name": "every source is read with the section's data format (data.name)",
    "max_length": "set max_length once, in the data section: all sources share it",
    "packing": "set packing once, in the data section",
    "sources": "sources do not nest",
}


@attrs.define
class DataSource:
    """One entry of ``data.sources``: a file, its mixing weight, and format options of its own."""

    path: str
    weight: Optional[float] = None
    options: dict = attrs.field(factory=dict)


@attrs.define
class DataHostOptions:
    """The host's own keys of the ``data`` section.

    :param packing: pack examples into sequences of ``max_length`` (core/packing.py).
    :param sources: several files to mix (None: the format's own ``path``).
    """

    packing: bool = False
    sources: Optional[list[DataSource]] = None

    @property
    def weighted(self) -> bool:
        """Whether the sources are sampled by weight (else concatenated)."""
        return bool(self.sources) and all(s.weight is not None for s in self.sources or [])


def split_host_options(options: dict, path: str = "data") -> tuple[dict, DataHostOptions]:
    """Take the host keys out of a ``data`` section's options: (the format's options, the host's)."""
    options = dict(options)
    packing = options.pop("packing", False)
    if not isinstance(packing, bool):
        raise ConfigError(f"{path}.packing", f"must be true or false, got {short_repr(packing)}")
    raw = options.pop("sources", None)
    if raw is None:
        return options, DataHostOptions(packing, None)
    if "path" in options:
        raise ConfigError(f"{path}.sources", "set either data.path (one file) or data.sources (several), not both")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}.sources", f"must be a non-empty list of {{path, weight, ...}} mappings, got {short_repr(raw)}")
    sources = [_source(item, f"{path}.sources[{i}]") for i, item in enumerate(raw)]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        missing = weighted.index(False)
        raise ConfigError(f"{path}.sources[{missing}].weight", "give every source a weight (sampled by weight) or none (concatenated)")
    return options, DataHostOptions(packing, sources)


def _source(item: Any, path: str) -> DataSource:
    if not isinstance(item, Mapping):
        raise ConfigError(path, f"must be a mapping with a 'path' key, got {short_repr(item)}")
    options = dict(item)
    for key, why in SOURCE_FORBIDDEN.items():
        if key in options:
            raise ConfigError(f"{path}.{key}", why)
    file = options.pop("path", None)
    if not isinstance(file, str) or not file:
        raise ConfigError(f"{path}.path", "is required (a data file)" if file is None else f"must be a string, got {short_repr(file)}")
    weight = options.pop("weight", None)
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{path}.weight", f"must be a number > 0, got {short_repr(weight)}")
        weight = float(weight)
    return DataSource(file, weight, options)


def mixed_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many training examples each source gets: shares of ``sum(sizes)`` proportional to
    ``weights``, rounded by largest remainder (ties to the earlier source) so they add up."""
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_indices(size: int, count: int, seed: int, source: int) -> list[int]:
    """``count`` indices into ``range(size)``: every index ``count // size`` times, then a
    seeded sample (without replacement) of ``count % size`` more."""
    full, rest = divmod(count, size)
    rng = random.Random(seed * 1_000_003 + source)
    return list(range(size)) * full + sorted(rng.sample(range(size), rest))


def _trained(example: dict) -> int:
    labels = example["labels"]
    return sum(1 for label in list(labels)[1:] if label != -100) if isinstance(labels, (list, tuple)) else 1


class MixedSources(DataFormat):
    """The sources of ``data.sources``, each loaded by its own instance of the section's data
    format, mixed into one set of splits (see the module docstring).

    :param formats: one configured data-format instance per source.
    :param sources: the parsed sources (paths as written, weights).
    :param options: the section-level options (validated with the first source's path), what
        ``options`` of this plugin reports.
    """

    def __init__(self, formats: Sequence[DataFormat], sources: Sequence[DataSource], options: Any) -> None:
        super().__init__(options)
        self.formats, self.sources = list(formats), list(sources)
        self.name = self.formats[0].name  # type: ignore[misc]  # instance attribute shadows the class default
        self.tasks = self.formats[0].tasks  # type: ignore[misc]

    def check(self, base_dir: Path, config_path: str = "data") -> None:
        """Each source's own check."""
        for i, fmt in enumerate(self.formats):
            fmt.check(base_dir, f"{config_path}.sources[{i}]")

    def input_paths(self, base_dir: Path) -> list[Path]:
        """Every source's files."""
        return [path for fmt in self.formats for path in fmt.input_paths(base_dir)]

    def load(self, context: DataContext) -> DataSplits:
        """Load every source (errors name ``data.sources[i]``) and mix the training splits."""
        loaded = [fmt.load(attrs.evolve(context, config_path=f"{context.config_path}.sources[{i}]")) for i, fmt in enumerate(self.formats)]
        sizes = [len(s.train) for s in loaded]
        weighted = all(s.weight is not None for s in self.sources)
        if weighted:
            counts = mixed_counts(sizes, [float(s.weight or 0) for s in self.sources])
            for i, (size, count) in enumerate(zip(sizes, counts)):
                if count and not size:
                    raise ConfigError(f"{context.config_path}.sources[{i}]", "has no training example to sample from")
            picks = [sample_indices(size, count, context.seed, i) if count else [] for i, (size, count) in enumerate(zip(sizes, counts))]
        else:
            picks = [list(range(size)) for size in sizes]
        train: list[dict] = []
        report = []
        for i, (split, pick) in enumerate(zip(loaded, picks)):
            chosen = [split.train[j] for j in pick]
            train.extend(chosen)
            report.append(
                {
                    "path": self.sources[i].path,
                    "weight": self.sources[i].weight,
                    "rows": split.rows,
                    "dropped": split.dropped,
                    "train_examples": len(chosen),
                    "distinct_train_examples": len(set(pick)),
                    "eval_examples": len(split.eval),
                    "tokens": sum(len(e["input_ids"]) for e in chosen),
                    "trained_tokens": sum(_trained(e) for e in chosen),
                }
            )
        for key, share in (("train_examples", "example_share"), ("tokens", "token_share")):
            total = sum(r[key] for r in report)
            for r in report:
                r[share] = round(r[key] / total, 4) if total else 0.0
        evaluation = [e for split in loaded for e in split.eval]
        rows = [s.rows for s in loaded]
        return DataSplits(
            train,
            evaluation,
            num_labels=loaded[0].num_labels,
            rows=sum(r for r in rows if r is not None) if any(r is not None for r in rows) else None,
            dropped=sum(s.dropped for s in loaded),
            sources=report,
        )
