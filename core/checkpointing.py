"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint directory ``checkpoints/step-NNNNNNNN`` holds the trainable weights, the optimizer's
tensors (safetensors) and its non-tensor state, the scheduler state, RNG states, the data position
and step counter, the resolved config and plugin versions. It is written into a temporary sibling
and renamed into place, so a crash (or a full disk) during a save leaves the previous checkpoint
intact; only complete checkpoints have the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qlora_plugins.core.errors import QloraError, TrainingError
from qlora_plugins.core.rundir import dumps
from qlora_plugins.core.safety import TEMP_SUFFIX, is_temporary
from qlora_plugins.core.training import TrainState
from qlora_plugins.core.wording import option

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def _encode(value: Any, name: str, tensors: dict) -> Any:
    """JSON-able description of ``value``; tensors (also nested in dicts/lists) go to ``tensors``."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().contiguous().cpu()
        return {"tensor": name, "device": str(value.device)}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    return {"value": value}


def _decode(spec: dict, tensors: dict) -> Any:
    if "tensor" in spec:
        return tensors[spec["tensor"]].to(spec["device"])
    if "dict" in spec:
        return {k: _decode(v, tensors) for k, v in spec["dict"].items()}
    if "list" in spec:
        return [_decode(v, tensors) for v in spec["list"]]
    return spec["value"]


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able structure."""
    tensors: dict = {}
    state = {str(index): _encode(values, str(index), tensors) for index, values in state_dict["state"].items()}
    return tensors, {"param_groups": state_dict["param_groups"], "state": state}


def _unflatten_optimizer(tensors: dict, structure: dict) -> dict:
    state = {int(index): _decode(spec, tensors) for index, spec in structure["state"].items()}
    return {"state": state, "param_groups": structure["param_groups"]}


def trainable_state(model: Any) -> dict:
    """Trainable parameters by name (detached CPU copies)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_training_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState, meta: dict, keep: int) -> Path:
    """Write a complete checkpoint for ``state.step`` and prune all but the newest ``keep``."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{state.step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise QloraError(f"cannot write checkpoint {final}: {exc.strerror or exc}; earlier checkpoints are kept") from None
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_structure = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        trainer = {
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "optimizer": opt_structure,
            "scheduler": scheduler.state_dict(),
            **meta,
        }
        (tmp / "trainer_state.json").write_text(dumps(trainer, indent=1), encoding="utf-8")
        for file in tmp.iterdir():  # make the data durable before the rename publishes it
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise QloraError(f"cannot write checkpoint {final}: {reason}; earlier checkpoints are kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and the temporaries that a kill
    left behind (a checkpoint half written, or half deleted).

    Each old checkpoint is renamed to a temporary name before it is deleted: a kill in the middle
    of the deletion leaves a temporary that the next prune removes, never a ``step-*`` directory
    without its trainer_state.json that no prune would recognise again. Called by the one process
    that writes the run directory, after its own checkpoint is complete, so no temporary here
    belongs to a write in progress."""
    root = run_dir / CHECKPOINTS
    for stale in root.iterdir():
        if is_temporary(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = root / f".{old.name}.{os.getpid()}.pruned{TEMP_SUFFIX}"
        try:
            os.replace(old, doomed)
        except OSError:
            continue  # deleted by someone else, or not ours to move: leave it
        shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written files and directories left in a run directory by a killed process:
    checkpoint and export temporaries, and temporary files of atomic writes."""
    from qlora_plugins.core.safety import remove_stale_temporaries as remove_in

    for directory in (run_dir, run_dir / CHECKPOINTS, run_dir / "exports"):
        remove_in(directory)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict:
    """The JSON part of a checkpoint, checked for the fields and types a resume needs.

    :raises TrainingError: the file is missing, not JSON, or tampered with.
    """
    path = checkpoint / "trainer_state.json"
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TrainingError(f"checkpoint {checkpoint} is unreadable: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(trainer, dict):
        raise TrainingError(f"checkpoint {checkpoint}: trainer_state.json is not a JSON object")
    for key in ("step", "epoch", "batch_in_epoch"):
        value = trainer.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrainingError(f"checkpoint {checkpoint}: trainer_state.json {key} must be a non-negative integer, got {str(value)[:40]}")
    if (
        checkpoint.name.startswith(PREFIX)
        and checkpoint.name[len(PREFIX) :].isdigit()
        and int(checkpoint.name[len(PREFIX) :]) != trainer["step"]
    ):
        raise TrainingError(f"checkpoint {checkpoint}: trainer_state.json says step {trainer['step']}")
    optimizer = trainer.get("optimizer")
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("param_groups"), list)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(trainer.get("scheduler"), dict)
    ):
        raise TrainingError(f"checkpoint {checkpoint}: trainer_state.json lacks the optimizer or scheduler state")
    return trainer


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def verify_checkpoint(checkpoint: Path) -> dict:
    """Check that every file of ``checkpoint`` is complete (without loading tensors); return its
    trainer state.

    :raises TrainingError: naming what is wrong.
    """
    from qlora_plugins.core.checkpoint_format import check_safetensors
    from qlora_plugins.core.errors import ModelError

    trainer = read_trainer_state(checkpoint)
    for name in CHECKPOINT_FILES:
        try:
            check_safetensors(checkpoint / name)
        except ModelError as exc:
            raise TrainingError(f"checkpoint {checkpoint}: {exc}") from None
    return trainer


def usable_checkpoints(run_dir: Path, log: Any = None) -> list[Path]:
    """Complete checkpoints that pass :func:`verify_checkpoint`, newest first; each one skipped
    is reported through ``log`` with the reason."""
    usable = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(checkpoint)
        except TrainingError as exc:
            if log is not None:
                log(f"Skipping checkpoint {checkpoint.name}: {exc}")
            continue
        usable.append(checkpoint)
    return usable


def restore_latest(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, log: Any) -> tuple[Path | None, TrainState | None]:
    """Restore the newest intact checkpoint of ``run_dir``; a corrupt newer one is skipped with
    a line saying which and why. ``(None, None)`` when there is no checkpoint at all.

    :raises TrainingError: checkpoints exist but none is intact.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None, None
    for checkpoint in usable_checkpoints(run_dir, log):
        try:
            return checkpoint, load_training_checkpoint(checkpoint, model, optimizer, scheduler)
        except TrainingError as exc:
            log(f"Skipping checkpoint {checkpoint.name}: {exc}")
    raise TrainingError(
        f"{option('resume')}: none of the {len(found)} checkpoint(s) in {run_dir / CHECKPOINTS} is intact; "
        f"start again with {option('force')}, or keep the run as it is"
    )


def load_training_checkpoint(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from ``checkpoint``; return the data position.

    :raises TrainingError: the checkpoint is corrupt, tampered with or does not fit the model.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    trainer = read_trainer_state(checkpoint)
    try:
        weights = load_file(str(checkpoint / "trainable.safetensors"))
        opt_tensors = load_file(str(checkpoint / "optimizer.safetensors"))
        rng = load_file(str(checkpoint / "rng.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise TrainingError(f"checkpoint {checkpoint} is corrupt: {exc}") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise TrainingError(f"checkpoint {checkpoint} does not match the model's trainable parameters")
    for name, tensor in weights.items():
        if params[name].shape != tensor.shape:
            raise TrainingError(f"checkpoint {checkpoint}: {name} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise TrainingError(f"checkpoint {checkpoint}: {name} holds NaN or infinite values")
    if "torch" not in rng:
        raise TrainingError(f"checkpoint {checkpoint}: rng.safetensors has no torch RNG state")
    try:
        optimizer_state = _unflatten_optimizer(opt_tensors, trainer["optimizer"])
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(rng["torch"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise TrainingError(
            f"checkpoint {checkpoint}: optimizer, scheduler or RNG state is corrupt "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{i}"], i)
    return TrainState(step=trainer["step"], epoch=trainer["epoch"], batch_in_epoch=trainer["batch_in_epoch"])


#: Config keys that may differ between a run and its resumption (they do not change the weights
#: computed for the steps already done).
RESUMABLE_CHANGES = {
    ("track",),  # where metrics are tracked does not change the result
    ("train", "max_steps"),
    ("train", "epochs"),
    ("train", "eval_every"),
    ("train", "eval_max_batches"),
    ("train", "log_every"),
    ("train", "checkpoint_every"),
    ("train", "keep_checkpoints"),
    ("train", "device"),
    ("train", "threads"),
    ("train", "distributed"),  # checkpoints are consolidated: DDP, FSDP and one process read the same
    ("export",),
}


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted paths where ``new`` differs from ``old`` in a way that would change the result."""
    changes = []
    for section in sorted(set(old) | set(new)):
        if (section,) in RESUMABLE_CHANGES:
            continue
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if (section, key) not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
                    changes.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b:
            changes.append(f"{section}: changed")
    return changes
