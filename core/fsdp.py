"""FSDP-QLoRA: FSDP2 (``fully_shard``) per transformer block, the 4-bit base sharded too.

FSDP shards parameters, not buffers. A :class:`~qlora_plugins.core.quant_linear.QuantLinear`
keeps its packed codes and quantization constants in buffers; before sharding they become
frozen parameters *of their own dtype* (uint8 codes, fp32/uint8 scales). FSDP2 flattens a
group's shards of mixed dtypes through a uint8 view, so each rank keeps ~1/N of the codes and
constants and the all-gather carries the packed bytes, never a dequantized weight; inside the
block's forward (and its recomputation under gradient checkpointing) ``QuantLinear.state()``
sees the gathered tensors and decodes as on one process. docs/distributed.md says why this and
not a float-typed view or a tensor subclass.

Checkpoints stay in the single-process format: the trainable weights and optimizer states are
gathered (``full_tensor``) and rank 0 writes them; a resume reads them on every rank and keeps
each rank's shard, so the world size may change between a run and its resumption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from qlora_plugins.core.errors import TrainingError
from qlora_plugins.core.training import TrainState
from qlora_plugins.core.wording import option


def _quant_layers(model: Any) -> Iterable[Any]:
    from qlora_plugins.core.quant_linear import QuantLinear

    return (m for m in model.modules() if isinstance(m, QuantLinear))


def packed_to_parameters(model: Any) -> int:
    """Turn the packed tensors of every QuantLinear (those of at least one dimension) into
    frozen parameters, so that FSDP shards them; return how many were converted."""
    import torch

    count = 0
    for layer in _quant_layers(model):
        for key in list(layer._state_keys):
            tensor = getattr(layer, key)
            if isinstance(tensor, torch.nn.Parameter) or tensor.dim() == 0:
                continue
            delattr(layer, key)
            layer.register_parameter(key, torch.nn.Parameter(tensor, requires_grad=False))
            count += 1
    return count


def transformer_blocks(model: Any) -> list:
    """The repeated blocks to shard one by one: the classes the model names in
    ``_no_split_modules`` (transformers' own list), else the modules of its longest ModuleList."""
    import torch

    names: set = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: Any, device: str, world_size: int) -> None:
    """Shard ``model`` in place across the process group: each transformer block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    packed_to_parameters(model)
    mesh = init_device_mesh("cuda" if device == "cuda" else "cpu", (world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full(tensor: Any) -> Any:
    """The whole tensor of a (possibly sharded) parameter or state, on the CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def resident_quantized_bytes(model: Any) -> int:
    """Bytes of the packed base weights (codes and constants) this rank holds."""
    from torch.distributed.tensor import DTensor

    total = 0
    for layer in _quant_layers(model):
        for key in layer._state_keys:
            tensor = getattr(layer, key)
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            total += local.numel() * local.element_size()
    return total


def full_trainable_state(model: Any) -> dict:
    """The trainable weights by name, gathered whole (a collective: every rank calls it)."""
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, weights: dict) -> None:
    """Copy gathered trainable weights into an unsharded model."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


class _Gathered:
    """What save_training_checkpoint reads from a model and an optimizer, gathered whole."""

    def __init__(self, params: dict, optimizer_state: dict) -> None:
        self.params, self.optimizer_state = params, optimizer_state

    def named_parameters(self) -> Iterable[tuple[str, Any]]:
        import torch

        return ((n, torch.nn.Parameter(t, requires_grad=True)) for n, t in self.params.items())

    def state_dict(self) -> dict:
        return self.optimizer_state


def consolidated(model: Any, optimizer: Any) -> tuple[Any, Any]:
    """A model and an optimizer as the checkpoint writer sees them, with every sharded tensor
    gathered whole (a collective: every rank calls it)."""
    state = optimizer.state_dict()
    gathered = {
        "state": {
            index: {k: _full(v) if hasattr(v, "shape") else v for k, v in values.items()} for index, values in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }
    snapshot = _Gathered(full_trainable_state(model), gathered)
    return snapshot, snapshot


def _shard_like(full: Any, like: Any) -> Any:
    """``full`` distributed as ``like`` is (a DTensor's placements), or as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype).to(like.device), like.device_mesh, like.placements)
    return full.to(like.device) if hasattr(like, "device") else full


def restore_latest_sharded(out: Path, model: Any, optimizer: Any, scheduler: Any, log: Any) -> tuple[Path | None, TrainState | None]:
    """Restore the newest intact (consolidated) checkpoint into a sharded model: every rank reads
    it and keeps its shards. ``(None, None)`` without checkpoints."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qlora_plugins.core.checkpointing import _unflatten_optimizer, list_checkpoints, read_trainer_state, usable_checkpoints

    found = list_checkpoints(out)
    if not found:
        return None, None
    usable = usable_checkpoints(out, log)
    if not usable:
        raise TrainingError(
            f"{option('resume')}: none of the {len(found)} checkpoint(s) in {out / 'checkpoints'} is intact; start again with {option('force')}"
        )
    checkpoint = usable[0]
    trainer = read_trainer_state(checkpoint)
    try:
        weights = load_file(str(checkpoint / "trainable.safetensors"))
        opt_tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise TrainingError(f"checkpoint {checkpoint} is corrupt: {exc}") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise TrainingError(f"checkpoint {checkpoint} does not match the model's trainable parameters")
    with torch.no_grad():
        for name, tensor in weights.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise TrainingError(
                    f"checkpoint {checkpoint}: {name} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}"
                )
            params[name].copy_(_shard_like(tensor, params[name]))
    saved = _unflatten_optimizer(opt_tensors, trainer["optimizer"])
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        like = ordered[int(index)]
        state[index] = {
            k: _shard_like(v, like) if hasattr(v, "shape") and tuple(v.shape) == tuple(like.shape) else v for k, v in values.items()
        }
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        scheduler.load_state_dict(trainer["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise TrainingError(f"checkpoint {checkpoint}: optimizer or scheduler state does not fit ({type(exc).__name__})") from None
    return checkpoint, TrainState(step=trainer["step"], epoch=trainer["epoch"], batch_in_epoch=trainer["batch_in_epoch"])
