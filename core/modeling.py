"""Model helpers shared by the pipeline and by plugins: checkpoint checks, Auto classes,
linear-layer traversal, parameter counts and device choice."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

from qlora_plugins.core.errors import ModelError, short_text

#: Output heads are kept in full precision by every builtin quantizer.
DEFAULT_SKIP_MODULES = ("lm_head", "score", "classifier", "qa_outputs")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: Path, config_path: str = "model.path") -> None:
    """Raise ModelError unless ``path`` is a transformers checkpoint directory."""
    try:
        path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise ModelError(f"{config_path}: cannot use {short_text(path, 200)}: {exc.strerror or exc}") from None
    if not path.exists():
        raise ModelError(f"{config_path}: model directory not found: {path}")
    if not path.is_dir():
        raise ModelError(f"{config_path}: not a directory: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{config_path}: {path} is not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (RecursionError: absurdly deep nesting)
        raise ModelError(f"{config_path}: {config_file} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_path}: {config_file} has no 'model_type'; is this a transformers checkpoint?")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelError(f"{config_path}: {path} has no weights (model.safetensors or a sharded index)")
    for weights in safetensors_files(path, config_path):
        check_safetensors_header(weights, config_path)


def safetensors_files(path: Path, config_path: str = "model.path") -> list[Path]:
    """The safetensors files of checkpoint directory ``path`` (single file or the shards its
    index names); a shard the index names but that is missing is a :class:`ModelError`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{config_path}: {index} is not a valid safetensors index: {exc}") from None
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise ModelError(f"{config_path}: {index} names an invalid shard {name!r}")
            if not (path / name).is_file():
                raise ModelError(f"{config_path}: {index} names the shard {name}, which is missing")
        return [path / name for name in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def read_safetensors_header(path: Path) -> tuple[dict, int, int]:
    """``(header, header length, file size)`` of a safetensors file, reading only its header
    (at most 100 MB); the one parser of safetensors headers in the project.

    :raises ValueError: the file is too short, or the header does not fit or is not a JSON object.
    :raises OSError: the file cannot be read.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header length {n} does not fit in the file ({size} bytes)")
        header = json.loads(handle.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, n, size


def check_safetensors_header(path: Path, config_path: str | None = "model.path") -> list[str]:
    """Raise ModelError unless ``path`` is a complete safetensors file: its header parses, every
    tensor's byte range matches its dtype and shape, and the data ends where the file does (a
    truncated download or a file that is not safetensors at all is caught before loading).
    Returns the tensor names; errors start with ``config_path`` when given."""
    try:
        header, n, size = read_safetensors_header(path)
        end = 0
        names = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            names.append(name)
            begin, stop = meta["data_offsets"]
            count = 1
            for dim in meta["shape"]:
                count *= int(dim)
            itemsize = _DTYPE_BYTES.get(meta["dtype"])
            if not 0 <= begin <= stop or (itemsize is not None and stop - begin != count * itemsize):
                raise ValueError(f"tensor {name!r} has a byte range that does not match its dtype and shape")
            end = max(end, stop)
        data = size - 8 - n
        if end > data:
            raise ValueError(f"truncated: tensors need {end} data bytes, the file has {data}")
        if end < data:
            raise ValueError(f"{data - end} unexpected trailing bytes")
    except OSError as exc:
        where = f"{config_path}: " if config_path else ""
        raise ModelError(f"{where}cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
        where = f"{config_path}: " if config_path else ""
        raise ModelError(f"{where}{path} is corrupt or truncated (not a complete safetensors file: {exc})") from None
    return names


#: Modules a base or LM checkpoint lacks when it is loaded for classification (a new head), and
#: heads that a checkpoint has but a model without that head drops.
_NEW_HEAD_MODULES = ("score", "classifier", "qa_outputs", "pooler")
_DROPPED_HEAD_MODULES = ("lm_head", "cls", "score", "classifier", "qa_outputs", "pooler")


def _under(key: str, modules: Sequence[str]) -> bool:
    parts = key.split(".")
    return any(part in modules for part in parts[:-1])


def check_loading_info(info: dict, path: Path, architecture: str, new_head: bool, config_path: str = "model.path") -> None:
    """Raise ModelError when ``from_pretrained`` (``output_loading_info=True``) initialised
    weights the checkpoint lacks, or skipped weights it has: a ``config.json`` that describes
    another architecture than the weights would otherwise train a randomly initialised model.

    :param new_head: the model gets a head the checkpoint cannot have (sequence classification
        of a base or LM checkpoint), so missing head weights and unused LM heads are expected.
    """
    missing = sorted(k for k in info.get("missing_keys") or () if not (new_head and _under(k, _NEW_HEAD_MODULES)))
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not (new_head and _under(k, _DROPPED_HEAD_MODULES)))
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) and m else str(m) for m in info.get("mismatched_keys") or ()]
    errors = [str(e).strip().splitlines()[0] for e in info.get("error_msgs") or () if str(e).strip()]
    problems = []
    for label, keys in (
        ("missing from the checkpoint", missing),
        ("in the checkpoint but not in the model", unexpected),
        ("of another shape", mismatched),
    ):
        if keys:
            problems.append(f"{len(keys)} weight(s) {label} (e.g. {', '.join(keys[:2])})")
    if errors:
        problems.append(errors[0][:200])
    if problems:
        raise ModelError(
            f"{config_path}: {path}: the weights do not match the {architecture} that config.json describes: "
            f"{'; '.join(problems)}; is config.json from another model?"
        )


def auto_class(task: str) -> Any:
    """The transformers Auto class for a task name."""
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
    }[task]


def choose_device(requested: str) -> str:
    """``cuda`` if requested or available (``auto``), else ``cpu``; errors if cuda is missing."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device: cuda was requested but no CUDA device is available")
    return requested


def torch_dtype(name: str) -> Any:
    """A torch dtype from its config spelling (``float32``, ``bfloat16``, ``float16``)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_skipped(name: str, skip_modules: Sequence[str]) -> bool:
    """Whether module ``name`` matches a skip entry (by last component or dotted suffix)."""
    return any(name == s or name.endswith("." + s) for s in skip_modules)


def iter_linear_layers(model: Any, skip_modules: Sequence[str] = ()) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, module)`` for every ``torch.nn.Linear`` not skipped, in a stable order."""
    import torch

    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and not is_skipped(name, skip_modules):
            yield name, module


def set_submodule(model: Any, name: str, module: Any) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_parameters(model: Any) -> tuple[int, int]:
    """(total numel of parameters and buffers-free weights, trainable numel), counting stored
    elements; quantizers report their own logical counts through ``Quantizer.footprint``."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, with a pad token (EOS reused when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
