"""Model helpers shared by the pipeline and by plugins: checkpoint checks, Auto classes,
linear-layer traversal, parameter counts and device choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from qlora_plugins.core.errors import ModelError

#: Output heads are kept in full precision by every builtin quantizer.
DEFAULT_SKIP_MODULES = ("lm_head", "score", "classifier", "qa_outputs")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: Path, config_path: str = "model.path") -> None:
    """Raise ModelError unless ``path`` is a transformers checkpoint directory."""
    if not path.exists():
        raise ModelError(f"{config_path}: model directory not found: {path}")
    if not path.is_dir():
        raise ModelError(f"{config_path}: not a directory: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{config_path}: {path} is not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: {config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_path}: {config_file} has no 'model_type'; is this a transformers checkpoint?")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelError(f"{config_path}: {path} has no weights (model.safetensors or a sharded index)")


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
