"""Quantize while loading: build the model without initializing its weights, then read the
checkpoint tensor by tensor and quantize each linear weight as it arrives.

The skeleton's weights are allocated with ``torch.empty`` and never written, so the operating
system never backs them with memory; each linear's full-precision copy exists only while it is
being quantized. Checkpoints are safetensors (single file or sharded index), in any float dtype.
When a checkpoint's names do not map one-to-one onto the model (legacy names, fused weights), the
loader reports that and the caller falls back to ``from_pretrained`` followed by per-layer
quantization.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Optional

from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, is_skipped, safetensors_files


class StreamingUnsupported(Exception):
    """The checkpoint cannot be streamed onto this model (the caller falls back)."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory."""
    files = safetensors_files(path)
    if not files:
        raise StreamingUnsupported("no safetensors weights")
    return files


def _open_unmapped(file: Path) -> Any:
    """``safe_open`` reading with ``pread`` (safetensors >= 0.8) instead of mapping the file:
    pages of a mapped file that were read stay in the process's resident set until the file is
    closed, so a mapped shard would add its whole size to the peak while it streams."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # older safetensors: mmap only
        return safe_open(str(file), framework="pt")


#: glibc's ``M_MMAP_THRESHOLD`` parameter number (``malloc.h``) and the value the loader fixes.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 10
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _libc() -> Any:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_heap_fragmentation() -> None:
    """Fix glibc's mmap threshold at 256 KiB for this process (``mallopt``), unless the user tuned
    malloc through the environment. ``qlora run`` does this for every run, and the streaming
    loader for every load.

    glibc starts at 128 KiB but raises the threshold, up to 32 MiB, each time a mapped block is
    freed; from then on every tensor of up to 32 MiB comes from the heap, and the interleaved
    lifetimes of training (per-layer temporaries, LoRA intermediates, decoded block constants,
    activations) leave it fragmented: a QLoRA step on a 42-layer 13.6B model grew the resident
    set by 5 GB of freed-but-kept memory, 1 GB at batch 4x256 on a 184M model. With the threshold
    fixed, blocks of 256 KiB and more are mapped and go back to the OS when freed. (At 1 MiB,
    the per-layer tensors of short batches, e.g. 128 tokens x hidden 1536 x 4 bytes = 768 KiB,
    still came from the heap, and its high-water mark grew as if gradient checkpointing were off:
    a 381M model's 1 x 128 step added 350 MiB instead of 165 MiB; step time within noise.)
    """
    import os

    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except AttributeError:  # not glibc
        pass


def release_free_memory() -> None:
    """Give memory that the C allocator keeps after frees back to the operating system (glibc
    ``malloc_trim``; a no-op elsewhere). Streaming frees one full-precision tensor after another
    between the small allocations of the quantized codes, which leaves free holes that glibc does
    not return on its own; trimming once after the load takes the resident set down to what the
    model really holds."""
    import ctypes

    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(ctypes.c_size_t(0))
    except AttributeError:  # not glibc (e.g. musl): nothing to trim
        pass


#: Unquantized tensors larger than this are copied in row chunks of about this size, so that an
#: embedding matrix never exists twice (checkpoint copy + model copy) in full.
COPY_CHUNK_BYTES = 32 << 20


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def tensor_locations(file: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """``{key: (safetensors dtype, shape, absolute start, absolute end)}`` from a safetensors
    file's header; no tensor data is read."""
    from qlora_plugins.core.modeling import read_safetensors_header

    header, length, _size = read_safetensors_header(Path(file))
    base = 8 + length
    return {
        key: (meta["dtype"], tuple(meta["shape"]), base + meta["data_offsets"][0], base + meta["data_offsets"][1])
        for key, meta in header.items()
        if key != "__metadata__"
    }


def _readable_locations(file: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """:func:`tensor_locations`, or nothing when the header cannot be read (``safe_open`` then
    reports the file's problem in its own words)."""
    try:
        return tensor_locations(file)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error):
        return {}


def _read_rows(fd: int, location: tuple[str, tuple[int, ...], int, int], start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a tensor, read with ``os.pread`` (safetensors' own slices read the
    whole tensor first, which defeats chunking)."""
    import torch

    dtype, shape, begin, _ = location
    row_numel = math.prod(shape[1:])
    torch_dtype = getattr(torch, _ST_DTYPES[dtype])
    row_bytes = row_numel * torch.empty((), dtype=torch_dtype).element_size()
    data = bytearray(os.pread(fd, (stop - start) * row_bytes, begin + start * row_bytes))
    if len(data) != (stop - start) * row_bytes:
        raise StreamingUnsupported(f"truncated tensor data at byte {begin + start * row_bytes}")
    return torch.frombuffer(data, dtype=torch_dtype).reshape((stop - start, *shape[1:]))


def _copy_into(
    target: Any, handle: Any, key: str, fd: Optional[int] = None, location: Optional[tuple[str, tuple[int, ...], int, int]] = None
) -> None:
    """Copy checkpoint tensor ``key`` into ``target`` (converting its dtype in place), in row
    chunks read straight from the file (``fd``, ``location``) when it is large."""
    import torch

    shape = tuple(location[1]) if location is not None else tuple(handle.get_slice(key).get_shape())
    if shape != tuple(target.shape):
        raise StreamingUnsupported(f"{key}: shape {shape} != {tuple(target.shape)}")
    row_bytes = (target.numel() // shape[0]) * 4 if shape and shape[0] else 0
    with torch.no_grad():
        if not row_bytes or target.numel() * 4 <= COPY_CHUNK_BYTES or fd is None or location is None or location[0] not in _ST_DTYPES:
            target.copy_(handle.get_tensor(key))
            return
        rows = max(1, COPY_CHUNK_BYTES // row_bytes)
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])
            target[start:stop].copy_(_read_rows(fd, location, start, stop))


def linear_like_layers(model: Any, skip_modules: list[str]) -> dict[str, Any]:
    """``nn.Linear`` and transformers ``Conv1D`` layers to quantize, by module name."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    return {
        name: module
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and not is_skipped(name, skip_modules)
    }


def _nbytes(location: Any) -> int:
    """Bytes of a tensor in its file (0 when its location is unknown), for the loading progress."""
    return int(location[3] - location[2]) if location else 0


def stream_load(request: Any, make_layer: Callable[[str, Any, Any], Any], skip_modules: list[str]) -> Any:
    """Load ``request.path`` into a fresh model, calling ``make_layer(name, module, weight)`` for
    each linear layer as soon as its weight is read; its return value replaces the module.

    :raises StreamingUnsupported: when names or shapes do not match the model built from config.
    """
    import torch
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from qlora_plugins.core.modeling import set_submodule
    from qlora_plugins.core.progress import advance

    files = checkpoint_files(Path(request.path))
    limit_heap_fragmentation()
    config = AutoConfig.from_pretrained(str(request.path), trust_remote_code=request.trust_remote_code, **request.model_kwargs)
    with no_init_weights():
        model = request.auto_class.from_config(config, dtype=request.dtype, trust_remote_code=request.trust_remote_code)
    skip = [*skip_modules, *DEFAULT_SKIP_MODULES]
    layers = linear_like_layers(model, skip)
    if getattr(request, "frozen_dtype", None) is not None:  # 16-bit storage before the copies
        from qlora_plugins.core.frozen import prepare_skeleton

        prepare_skeleton(model, request.frozen_dtype, set(layers))
    weight_keys = {f"{name}.weight": name for name in layers}
    # (not the skeleton's linear weights: holding them would keep them allocated until the end)
    params = {key: p for key, p in model.named_parameters() if key not in weight_keys}
    buffers = dict(model.named_buffers())
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for file in files:
        locations = _readable_locations(file)
        with _open_unmapped(file) as handle, open(file, "rb") as raw:
            for key in handle.keys():
                if key in weight_keys:
                    name = weight_keys[key]
                    module = layers[name]
                    tensor = handle.get_tensor(key)
                    if tuple(tensor.shape) != tuple(module.weight.shape):
                        raise StreamingUnsupported(f"{key}: shape {tuple(tensor.shape)} != {tuple(module.weight.shape)}")
                    weight = tensor.to(request.dtype)
                    if not isinstance(module, torch.nn.Linear):  # Conv1D stores (in, out)
                        weight = weight.t().contiguous()
                    bias = module.bias
                    new = make_layer(name, module, weight)
                    set_submodule(model, name, new)
                    layers[name] = new
                    if bias is not None:
                        params[f"{name}.bias"] = new.bias
                    seen.add(key)
                    advance(_nbytes(locations.get(key)))
                    del weight, tensor
                    continue
                target = params.get(key)
                if target is None:
                    target = buffers.get(key)
                if target is None:
                    raise StreamingUnsupported(f"checkpoint tensor {key} has no place in the model")
                _copy_into(target, handle, key, raw.fileno(), locations.get(key))
                seen.add(key)
                advance(_nbytes(locations.get(key)))
    missing = {k for k in expected - seen if not k.endswith(".weight") or k not in weight_keys}
    tied = set()
    if getattr(config, "tie_word_embeddings", False) or getattr(
        getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False
    ):
        model.tie_weights()
        out = model.get_output_embeddings()
        if out is not None:
            tied = {k for k in missing if k.endswith(".weight") and is_skipped(k[: -len(".weight")], DEFAULT_SKIP_MODULES)}
    missing -= tied
    if missing:
        raise StreamingUnsupported(f"tensors missing from the checkpoint: {', '.join(sorted(missing)[:5])}")
    release_free_memory()
    return model.to(request.device).eval()
