"""Tokenized datasets at scale: batched ``datasets`` maps kept as memory-mapped Arrow files and
cached under ``$QLORA_PLUGINS_HOME/data``.

A data format hands :func:`tokenize_cached` its data files and a ``prepare`` callable that, given
the raw rows (a ``datasets.Dataset`` read from disk, never a Python list), returns an
:class:`Encoder`: a batched ``encode(batch, indices)`` function and the facts to keep with the
entry. The result is a :class:`TokenizedSet` whose ``dataset`` is memory-mapped Arrow.

An entry is keyed by the data files (resolved path, size, ``mtime_ns`` and a streamed content
digest, memoised by ``(path, size, mtime_ns)``), the tokenizer's fingerprint, the format's name,
options and code version, and this module's version. Entries are written into a temporary
directory and renamed into place; a damaged entry is detected on load, moved aside and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, overload

import attrs

from qlora_plugins.core.datafiles import check_data_file, is_text_builder, read_rows, split_indices
from qlora_plugins.core.errors import DataError, WriteError
from qlora_plugins.core.rundir import atomic_write_text
from qlora_plugins.core.safety import TEMP_SUFFIX
from qlora_plugins.core.sources import ENV_HOME, cache_home

#: Version of the entry layout and of the machinery; part of every key.
CACHE_VERSION = "1"
META = "meta.json"
#: Files at least this big are tokenized with ``num_proc`` worker processes (when not set).
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
#: Temporaries in the cache older than this are left by killed processes and are removed.
STALE_AFTER_S = 6 * 3600
CHUNK = 1 << 20
#: Options of :class:`~qlora_plugins.core.interfaces.DataOptions` that do not change the tokens.
NOT_KEYED = frozenset({"eval_fraction", "min_kept_fraction", "num_proc", "cache"})


def data_cache_dir() -> Path:
    """Where tokenized datasets are cached: ``$QLORA_PLUGINS_HOME/data``."""
    return cache_home() / "data"


# --- fingerprints ---------------------------------------------------------------------------


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def scan_file(path: Path, config_path: str = "data.path", utf8: bool = True) -> str:
    """Stream ``path`` once in 1 MiB chunks: its content digest (BLAKE2b), and with ``utf8`` a
    check that it is UTF-8 text, raising ``DataError`` with the byte offset and line of the first
    bad byte. Memoised by ``(path, size, mtime_ns)`` in the process and on disk, so a file is read
    once however often it is used."""
    import codecs

    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    known = _DIGESTS.get(memo) or _read_memo(memo, utf8)
    if known:
        _DIGESTS[memo] = known
        return known
    digest = hashlib.blake2b(digest_size=20)
    decoder = codecs.getincrementaldecoder("utf-8")() if utf8 else None
    fed, lines = 0, 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if decoder is not None:
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    offset = fed - pending + exc.start
                    if exc.start >= pending:
                        lines += chunk[: exc.start - pending].count(b"\n")
                    raise DataError(f"{config_path}: {path} is not UTF-8 text (byte {offset}, line {lines})") from None
                lines += chunk.count(b"\n")
            if not chunk:
                break
            digest.update(chunk)
            fed += len(chunk)
    value = digest.hexdigest()
    _DIGESTS[memo] = value
    _write_memo(memo, utf8, value)
    return value


def _memo_path(memo: tuple[str, int, int], utf8: bool) -> Path:
    return data_cache_dir() / "digests" / f"{_sha(json.dumps([*memo, utf8]))[:40]}.txt"


def _read_memo(memo: tuple[str, int, int], utf8: bool) -> str | None:
    try:
        text = _memo_path(memo, utf8).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else None


def _write_memo(memo: tuple[str, int, int], utf8: bool, value: str) -> None:
    with contextlib.suppress(OSError, WriteError):  # a memo is an optimisation; a read-only home is fine
        atomic_write_text(_memo_path(memo, utf8), value + "\n")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything in ``tokenizer`` that decides the token ids: the serialized
    ``tokenizer.json`` of a fast tokenizer (else the vocabulary), the special tokens, the chat
    template, and the class and its BOS/EOS settings."""
    parts: dict[str, Any] = {"class": type(tokenizer).__qualname__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        serialized = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set by calls with truncation=/padding=, not part of the tokens
            serialized.pop(state, None)
        parts["tokenizer_json"] = _sha(json.dumps(serialized, sort_keys=True))
    elif hasattr(tokenizer, "get_vocab"):
        parts["vocab"] = _sha(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False))
    for name in ("special_tokens_map", "all_special_ids", "chat_template", "bos_token_id", "eos_token_id", "pad_token_id"):
        with contextlib.suppress(Exception):
            parts[name] = getattr(tokenizer, name, None)
    for name in ("add_bos_token", "add_eos_token", "padding_side", "truncation_side", "model_max_length"):
        with contextlib.suppress(Exception):
            parts[name] = getattr(tokenizer, name, None)
    return _sha(json.dumps(parts, sort_keys=True, default=str))


def options_fingerprint(options: Any, exclude: frozenset = NOT_KEYED) -> dict:
    """The options that decide the tokens, as a JSON-able mapping (an attrs instance or a
    mapping; ``exclude`` names those that do not, like ``eval_fraction``)."""
    values = attrs.asdict(options) if attrs.has(type(options)) else dict(options)
    return json.loads(json.dumps({k: v for k, v in sorted(values.items()) if k not in exclude}, default=str))


def code_fingerprint(obj: Any) -> str:
    """A digest of the source file that defines ``obj`` (a class or function), so that editing a
    format's code invalidates its cache entries; its qualified name when the source is unknown."""
    import inspect

    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    try:
        source = inspect.getsourcefile(obj)
        return _sha(name.encode() + Path(source).read_bytes()) if source else _sha(name)
    except (OSError, TypeError):
        return _sha(name)


# --- the entry ------------------------------------------------------------------------------


@attrs.define
class Encoder:
    """What a format's ``prepare(rows)`` returns.

    :param encode: ``encode(batch, indices) -> columns``: ``batch`` maps column names to lists of
        values, ``indices`` are the rows' 0-based positions in the file (for ``row N`` errors);
        it returns equal-length lists (one item per input row) of JSON-able values. Raise
        ``DataError`` for a bad row. It runs in worker processes, so it must be picklable (a
        closure over the tokenizer is).
    :param meta: JSON facts kept with the entry (e.g. ``num_labels``), returned on a cache hit.
    :param regroup: an optional second, sequential pass ``regroup(batch) -> columns`` over the
        encoded batches in order (it may keep state and return any number of rows: e.g. cutting
        a token stream into blocks).
    :param batch_size: rows per ``encode`` call.
    :param features: the ``datasets.Features`` of ``encode``'s columns (recommended: a batch of
        only empty lists would otherwise fix a wrong type); ``regroup_features`` for ``regroup``.
        ``meta`` is read after both passes, so ``regroup`` may record facts in it.
    """

    encode: Callable[[dict, list], dict]
    meta: dict = attrs.field(factory=dict)
    regroup: Optional[Callable[[dict], dict]] = None
    batch_size: int = 1000
    features: Any = None
    regroup_features: Any = None


@attrs.define
class TokenizedSet:
    """A tokenized dataset: ``dataset`` is a memory-mapped ``datasets.Dataset``.

    :param rows: rows read from the data files (after ``max_examples``).
    :param meta: the :class:`Encoder`'s facts.
    :param hit: whether it came from the cache.
    :param path: the cache entry (None when ``cache`` is off: a temporary directory then).
    """

    dataset: Any
    rows: int
    meta: dict
    hit: bool
    path: Optional[Path]
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for the run's log: where the tokens came from and how long it took."""
        if self.hit:
            return f"data: {self.rows:,} rows, tokenized set from the cache {self.path} ({self.seconds:.1f} s)"
        where = f"cached in {self.path}" if self.path else "not cached (data.cache: false)"
        return f"data: {self.rows:,} rows tokenized in {self.seconds:.1f} s; {where}"

    def column(self, name: str) -> Any:
        """One column as a numpy array (read from the memory-mapped file, not through Python)."""
        return self.dataset.data.column(name).to_numpy()


def choose_num_proc(total_bytes: int, requested: Optional[int]) -> int:
    """Worker processes for tokenizing: ``requested``, else the usable cores (at most 8) for
    files of at least :data:`PARALLEL_MIN_BYTES`, else 1."""
    if requested:
        return max(1, int(requested))
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def entry_key(
    files: Sequence[Path], tokenizer_fp: str, name: str, options: Mapping, code: str, config_path: str, builders: Sequence[str]
) -> str:
    """The key of an entry (see the module docstring)."""
    described = []
    for path, builder in zip(files, builders):
        stat = path.stat()
        digest = scan_file(path, f"{config_path}.path", utf8=is_text_builder(builder))
        described.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest])
    from qlora_plugins import __version__

    parts = {
        "cache": CACHE_VERSION,
        "package": __version__,
        "files": described,
        "tokenizer": tokenizer_fp,
        "format": name,
        "options": options,
        "code": code,
    }
    return _sha(json.dumps(parts, sort_keys=True, default=str))[:32]


def _open_entry(path: Path, key: str) -> tuple[Any, dict] | None:
    """The dataset and meta of a complete, intact entry, or None when it is damaged."""
    import datasets

    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            return None
        parts = []
        for shard in meta["shards"]:
            file = path / shard["file"]
            if file.is_symlink() or not file.is_file() or file.stat().st_size != shard["bytes"]:
                return None
            part = datasets.Dataset.from_file(str(file), in_memory=False)
            if len(part) != shard["rows"]:
                return None
            parts.append(part)
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if list(dataset.column_names) != meta["columns"]:
            return None
        return dataset, meta
    except Exception:  # a truncated Arrow file, bad JSON, missing keys: all mean "rebuild"
        return None


def _discard(path: Path) -> None:
    """Move a damaged entry aside (atomically, so a concurrent reader never sees half of one) and
    delete it."""
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}-{time.time_ns()}{TEMP_SUFFIX}")
    try:
        os.rename(path, aside)
    except OSError:  # gone already (another process discarded it)
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale(directory: Path) -> None:
    """Delete temporaries in ``directory`` left by killed processes (older than STALE_AFTER_S)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and not entry.is_symlink():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_AFTER_S:
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


@contextlib.contextmanager
def _same_environ() -> Iterator[None]:
    """Keep ``os.environ`` the same object with the same contents: a parallel ``Dataset.map``
    replaces it by a copy (after changing TOKENIZERS_PARALLELISM for its workers), which would
    leave anyone holding the original (pytest's monkeypatch, a caller's reference) behind."""
    original, snapshot = os.environ, dict(os.environ)
    try:
        yield
    finally:
        os.environ = original
        for name in [name for name in original if name not in snapshot]:
            del original[name]
        for name, value in snapshot.items():
            if original.get(name) != value:
                original[name] = value


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import logging

    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    yield


def _build(
    work: Path,
    files: Sequence[Path],
    prepare: Callable[[Any], Encoder],
    config_path: str,
    max_examples: Optional[int],
    num_proc: int,
) -> tuple[list[dict], list[str], int, dict]:
    """Read, encode (and regroup) into ``work``; the shards, columns, rows and meta."""
    import datasets

    raw_dir = work / "raw"
    parts = [read_rows(path, f"{config_path}.path", cache_dir=raw_dir) for path in files]
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if max_examples:
        rows = rows.select(range(min(len(rows), max_examples)))
    encoder = prepare(rows)
    num_proc = max(1, min(num_proc, len(rows) // max(encoder.batch_size, 1) or 1))
    with _same_environ():
        encoded = rows.map(
            encoder.encode,
            batched=True,
            batch_size=encoder.batch_size,
            with_indices=True,
            remove_columns=rows.column_names,
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=str(work / "encoded.arrow"),
            features=encoder.features,
            load_from_cache_file=False,
            new_fingerprint=_sha(str(work))[:16],
            desc=None,
        )
    if encoder.regroup is not None:
        encoded = encoded.map(
            encoder.regroup,
            batched=True,
            batch_size=encoder.batch_size,
            remove_columns=encoded.column_names,
            cache_file_name=str(work / "regrouped.arrow"),
            features=encoder.regroup_features,
            load_from_cache_file=False,
            new_fingerprint=_sha(str(work) + "regroup")[:16],
        )
    shards = []
    for i, cache_file in enumerate(encoded.cache_files):
        source = Path(cache_file["filename"])
        target = work / f"part-{i:05d}.arrow"
        os.replace(source, target)
        shards.append({"file": target.name, "bytes": target.stat().st_size, "rows": 0})
    for shard in shards:  # the row counts, from the files as they now are
        shard["rows"] = len(datasets.Dataset.from_file(str(work / shard["file"]), in_memory=False))
    columns = list(encoded.column_names)
    n_rows = len(rows)
    del rows, encoded, parts
    for leftover in work.iterdir():
        if not leftover.name.startswith("part-"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return shards, columns, n_rows, dict(encoder.meta)


def tokenize_cached(
    files: Sequence[Path],
    prepare: Callable[[Any], Encoder],
    *,
    tokenizer: Any,
    name: str,
    options: Any = None,
    code: str = "",
    config_path: str = "data",
    max_examples: Optional[int] = None,
    num_proc: Optional[int] = None,
    cache: bool = True,
) -> TokenizedSet:
    """Tokenize ``files`` with ``prepare``'s encoder into memory-mapped Arrow, reusing the cache.

    :param files: the data files (read with :func:`~qlora_plugins.core.datafiles.read_rows`, in
        order, concatenated).
    :param prepare: ``prepare(rows) -> Encoder``; it may check columns (raise ``DataError``) and
        compute facts over whole columns (e.g. the label set). Called only on a cache miss.
    :param name: the format's name; ``options`` its options (an attrs instance or a mapping;
        see :func:`options_fingerprint`); ``code`` its code version (see
        :func:`code_fingerprint`): all three are part of the key, with the tokenizer.
    :param max_examples: read only the first rows.
    :param num_proc: worker processes (default: :func:`choose_num_proc`).
    :param cache: False: build into a temporary directory, removed when the process exits.
    :raises DataError: bad data (from the reader or the encoder).
    :raises WriteError: the cache directory cannot be written.
    """
    started = time.perf_counter()
    files = [Path(f) for f in files]
    builders = [check_data_file(path, f"{config_path}.path") for path in files]
    keyed = options_fingerprint(options) if options is not None else {}
    key = entry_key(files, tokenizer_fingerprint(tokenizer), name, {**keyed, "max_examples": max_examples}, code, config_path, builders)
    root = data_cache_dir() if cache else Path(tempfile.gettempdir())
    final = root / f"{name}-{key}" if cache else None  # without the cache: a fresh private directory
    with _quiet_datasets():
        if final is not None and final.exists():
            opened = _open_entry(final, key)
            if opened is not None:
                dataset, meta = opened
                return TokenizedSet(dataset, meta["rows"], meta["facts"], True, final, time.perf_counter() - started)
            _discard(final)
        try:
            if final is not None:
                root.mkdir(parents=True, exist_ok=True)
                _remove_stale(root)  # only in the cache, where every temporary is ours
                work = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.", suffix=TEMP_SUFFIX, dir=root))
            else:
                work = Path(tempfile.mkdtemp(prefix=f"qlora-data-{name}-"))
        except OSError as exc:
            raise WriteError(
                f"{config_path}: cannot write the data cache {root} ({ENV_HOME}): {exc.strerror or exc}; "
                f"set {config_path}.cache: false to build in the system temporary directory"
            ) from None
        try:
            total = sum(path.stat().st_size for path in files)
            shards, columns, rows, facts = _build(work, files, prepare, config_path, max_examples, choose_num_proc(total, num_proc))
            meta = {
                "version": CACHE_VERSION,
                "key": key,
                "format": name,
                "rows": rows,
                "facts": facts,
                "shards": shards,
                "columns": columns,
            }
            meta["files"] = [str(path) for path in files]
            atomic_write_text(work / META, json.dumps(meta, indent=1) + "\n")
            if final is None:
                _remove_at_exit(work)
                opened = _open_entry(work, key)
                location = None
            else:
                try:
                    os.replace(work, final)
                except OSError:  # another process finished the same entry first: use theirs
                    shutil.rmtree(work, ignore_errors=True)
                opened = _open_entry(final, key)
                location = final
            if opened is None:
                raise DataError(f"{config_path}: the tokenized data written to {location or work} cannot be read back")
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise WriteError(f"{config_path}: cannot write the data cache {root} ({ENV_HOME}): {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    dataset, meta = opened
    return TokenizedSet(dataset, meta["rows"], meta["facts"], False, location, time.perf_counter() - started)


def _remove_at_exit(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, True)


# --- examples -------------------------------------------------------------------------------


class Examples(Sequence[dict]):
    """A read-only sequence of examples (dicts of ``columns``) over an Arrow-backed dataset,
    optionally through a list of row indices. Indexing with a slice gives a list of dicts, so it
    stands in wherever a list of examples was used."""

    def __init__(
        self,
        dataset: Any,
        indices: Optional[Sequence[int]] = None,
        columns: Sequence[str] = ("input_ids", "labels"),
        same_as: Optional[Mapping[str, str]] = None,
    ) -> None:
        """:param columns: the dataset's columns each example holds.
        :param same_as: extra keys that repeat a column (``{"labels": "input_ids"}`` for plain
            language modelling), so the file stores the tokens once."""
        self._data = dataset.select_columns(list(columns)) if list(dataset.column_names) != list(columns) else dataset
        self._indices = list(indices) if indices is not None else None
        self.columns = tuple(columns)
        self.same_as = dict(same_as or {})
        #: the :class:`TokenizedSet` these examples come from (set by :func:`split_examples`)
        self.tokenized: Optional[TokenizedSet] = None

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else len(self._data)

    @overload
    def __getitem__(self, index: int) -> dict: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            positions = range(len(self))[index]
            if not len(positions):
                return []
            rows = [self._row(p) for p in positions]
            return rows
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range ({n} examples)")
        return self._row(index % n)

    def _row(self, position: int) -> dict:
        row = dict(self._data[self._indices[position] if self._indices is not None else position])
        for key, column in self.same_as.items():
            row[key] = list(row[column])
        return row

    def __iter__(self) -> Iterator[dict]:
        for position in range(len(self)):
            yield self._row(position)

    def __add__(self, other: Sequence[dict]) -> list[dict]:
        """Concatenation gives a list, as for lists of examples."""
        return list(self) + list(other)

    def __radd__(self, other: Sequence[dict]) -> list[dict]:
        return list(other) + list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Examples, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, columns={list(self.columns)})"


def split_examples(
    tokenized: TokenizedSet,
    keep: Any,
    eval_fraction: float,
    seed: int,
    columns: Sequence[str] = ("input_ids", "labels"),
    same_as: Optional[Mapping[str, str]] = None,
) -> tuple[Examples, Examples]:
    """Train and eval :class:`Examples` over the rows of ``tokenized`` where ``keep`` (a boolean
    array, or None for all) is true, split by
    :func:`~qlora_plugins.core.datafiles.split_indices` over the kept rows in file order: the
    same split, a deterministic function of the seed, as a list of those examples would get.
    ``columns`` and ``same_as`` are :class:`Examples`'s."""
    import numpy as np

    kept = np.flatnonzero(keep) if keep is not None else np.arange(len(tokenized.dataset))
    train_idx, eval_idx = split_indices(len(kept), eval_fraction, seed)
    train = Examples(tokenized.dataset, kept[train_idx].tolist(), columns, same_as)
    evaluation = Examples(tokenized.dataset, kept[eval_idx].tolist(), columns, same_as)
    train.tokenized = evaluation.tokenized = tokenized
    return train, evaluation
