"""Distributed training on ``torch.distributed``: one process per rank, started by torchrun's
elastic agent (``qlora run --nproc-per-node``, core/launch.py) or by an external ``torchrun`` /
``accelerate launch``, recognized from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

``train.batch_size`` is the *global* micro-batch: every rank takes its slice of the same seeded
global batch, so a config gives the same adapter (within the reduce-order tolerance of
docs/distributed.md) on any number of processes and a checkpoint resumes on another world size.
The loss of an optimizer step is normalized by the trained-token count of the whole step on all
ranks (one all-reduce of the count before the step's forward passes).

Rank 0 alone writes the run directory; the other ranks train, take part in the collectives of
checkpoints and exports, and write nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs

from qlora_plugins.core.errors import ConfigError, DistributedError, QloraError, QuietExit
from qlora_plugins.core.packing import trained_tokens
from qlora_plugins.core.pipeline import Attached, Pipeline, Prepared, RunDirectory, _first_line
from qlora_plugins.core.report import peak_rss_bytes
from qlora_plugins.core.run_report import RunReport
from qlora_plugins.core.training import TrainLoop, TrainState, move_batch, step_loss
from qlora_plugins.core.wording import option

STRATEGIES = ("ddp", "fsdp")
#: ``train.distributed`` and the strategy of a plain one-process run.
NO_DISTRIBUTION = "none"
#: ``RANK:STEP``: that rank raises at the start of that optimizer step (a testing aid: how a
#: failure on one rank stops the job).
FAULT_ENV = "QLORA_PLUGINS_FAULT_RANK"


@attrs.frozen
class World:
    """This process's place in the job (from the launcher's environment)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: Any = None) -> World | None:
    """The job this process belongs to, when a launcher (torchrun, accelerate) set ``RANK`` and
    ``WORLD_SIZE``; None for a plain process.

    :raises DistributedError: the variables are not integers or not consistent.
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={size}")
    return World(rank, size, local)


def strategy_for(train_cfg: Any, world_size: int) -> str:
    """``none``, ``ddp`` or ``fsdp`` for ``train.distributed`` on ``world_size`` processes
    (``auto``: DDP on several processes, none on one).

    :raises ConfigError: ``none`` on several processes.
    """
    wanted = train_cfg.distributed
    if wanted == "auto":
        return "ddp" if world_size > 1 else NO_DISTRIBUTION
    if wanted == NO_DISTRIBUTION and world_size > 1:
        raise ConfigError("train.distributed", f"is none, but the job has {world_size} processes; use auto, ddp or fsdp")
    return wanted


def check_distributed(config: Any, plugins: Any, world_size: int) -> str:
    """Refuse, before anything loads, what cannot run on ``world_size`` processes; return the
    strategy.

    :raises ConfigError: naming the option at fault.
    """
    train_cfg = config.train
    strategy = strategy_for(train_cfg, world_size)
    if strategy == NO_DISTRIBUTION:
        return strategy
    if train_cfg.batch_size % world_size:
        raise ConfigError(
            "train.batch_size",
            f"{train_cfg.batch_size} does not divide across {world_size} ranks (it is the global micro-batch: "
            f"use a multiple of {world_size})",
        )
    if train_cfg.device == "cuda":
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < _local_world(world_size):
            raise ConfigError("train.device", f"cuda: {torch.cuda.device_count()} GPU(s) for {_local_world(world_size)} processes per node")
    if strategy == "fsdp":
        if not getattr(plugins.optimizer, "shardable", False):
            raise ConfigError(
                "optimizer.name",
                f"'{plugins.optimizer.name}' cannot update FSDP-sharded parameters (it pages, offloads or "
                "quantizes its states per whole tensor); use adamw with train.distributed: fsdp, or ddp",
            )
        refusal = plugins.quantizer.sharding_refusal()
        if refusal:
            option, _, reason = refusal.partition(": ")
            raise ConfigError(option, reason or refusal)
    return strategy


def _local_world(world_size: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of ``rank`` for optimizer step ``step`` (dropout): a function of the seed, so
    a resumed job draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def rank_slice(examples: list, world: World) -> list:
    """This rank's contiguous share of a global micro-batch (shares differ by at most one
    example, in the partial batch at the end of an epoch)."""
    n, size = len(examples), world.world_size
    start = world.rank * n // size
    return examples[start : (world.rank + 1) * n // size]


class DistributedTrainLoop(TrainLoop):
    """:class:`TrainLoop` whose step trains this rank's slice of each global micro-batch, with
    the loss normalized by the trained units of the whole step on every rank.

    :param world: this process's rank and the world size.
    :param strategy: ``ddp`` (gradients all-reduced by DDP) or ``fsdp`` (reduce-scattered).
    """

    def __init__(self, *args: Any, world: World, strategy: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.world, self.strategy = world, strategy
        # an interrupt does not checkpoint: the peers are being stopped too, the last periodic
        # checkpoint is the consistent one
        self.on_interrupt = lambda state: None
        fault = os.environ.get(FAULT_ENV, "")
        rank, _, step = fault.partition(":")
        self._fault_step = int(step) if rank.strip().isdigit() and int(rank) == world.rank and step.strip().isdigit() else None

    def _step(self, batches: Iterator[list[dict]], params: list) -> tuple[float | None, int, int, float | None]:
        """:meth:`TrainLoop._step` on this rank's slice of every micro-batch: the summed loss is
        divided by the trained tokens of the whole step on all ranks (all-reduced), so the
        gradient is the one-process gradient of the same global batch."""
        import torch
        import torch.distributed as dist

        cfg, world = self.cfg, self.world
        if self._fault_step is not None and self.state.step + 1 == self._fault_step:
            raise RuntimeError(f"fault injected by {FAULT_ENV} at step {self._fault_step}")
        torch.manual_seed(step_seed(cfg.seed, self.state.step, world.rank))
        micro, tokens = [], 0
        for _ in range(cfg.gradient_accumulation_steps):
            items = next(batches)
            mine = rank_slice(items, world)
            # a rank without examples (a tiny last batch) still runs forward and backward, on a
            # stand-in whose loss counts zero, so that the collectives match
            batch = self.collate_fn(mine or items[:1])
            count = trained_tokens(batch, self.task) if mine else 0
            tokens += sum(len(item["input_ids"]) for item in mine)
            micro.append((batch, count))
        counts = torch.tensor([float(sum(c for _, c in micro)), float(tokens)], dtype=torch.float64)
        dist.all_reduce(counts)
        total, total_tokens = counts[0].item(), int(counts[1].item())
        local_sum = 0.0
        for i, (batch, count) in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.strategy != "ddp" else self.model.no_sync()
            with sync:
                moved = move_batch(batch, self.device)
                if count and total:
                    summed = step_loss(self.model, moved, self.task)
                    if not torch.isfinite(summed):
                        raise QloraError(
                            f"loss became {summed.item()} at step {self.state.step + 1}; stopping (lower optimizer.lr, check the data); "
                            "the last checkpoint is kept"
                        )
                    # DDP and FSDP average gradients over ranks: scale back to a sum over the step
                    loss = summed * (world.world_size / total)
                    local_sum += summed.item()
                else:
                    loss = self.model(**{k: v for k, v in moved.items() if k != "labels"}).logits.sum() * 0.0
                loss.backward()
        summed_all = torch.tensor([local_sum], dtype=torch.float64)
        dist.all_reduce(summed_all)
        grad_norm = self._update(params, total)
        return (summed_all.item() / total if total else None), total_tokens, int(total), grad_norm


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class DistributedPipeline(Pipeline):
    """:class:`Pipeline` on one rank of a distributed job (see the module docstring)."""

    def __init__(self, *args: Any, world: World, strategy: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.world, self.strategy = world, strategy
        self.writes_run_dir = world.is_main
        self.backend = ""
        self.opened = False  # whether the run directory is open (errors before read the same on every rank)
        self._wrapped: Any = None
        self._gathered: Attached | None = None  # FSDP: rank 0's whole model, loaded again for the exports

    @property
    def loop_class(self) -> Any:  # type: ignore[override]
        return functools.partial(DistributedTrainLoop, world=self.world, strategy=self.strategy)

    def check(self) -> Any:
        # rank 0 first: it may create a model source in the cache, the others then find it there
        if self.world.is_main:
            checked = super().check()
            barrier()
            return checked
        barrier()
        return super().check()

    def prepare(self, checked: Any) -> Prepared:
        import torch

        if not checked.config.train.threads:  # one thread per process unless the config says otherwise
            torch.set_num_threads(1)
        return super().prepare(checked)

    def open_run_dir(self, prepared: Prepared) -> RunDirectory:
        self.opened = True
        barrier()  # every rank has checked the output (prepare) before rank 0 creates or replaces it
        if self.world.is_main:
            run_dir = super().open_run_dir(prepared)
            barrier()
            return run_dir
        barrier()
        return RunDirectory(prepared.out, None, self.resume)

    def distribute(self, prepared: Prepared, attached: Attached) -> tuple[Any, list]:
        from qlora_plugins.core.training import trainable_parameters

        if self.strategy == "fsdp":
            from qlora_plugins.core import fsdp

            fsdp.shard_model(attached.model, prepared.device, self.world.world_size)
            self._wrapped = attached.model
            return attached.model, trainable_parameters(attached.model)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.world.local_rank] if prepared.device == "cuda" else None
        self._wrapped = DistributedDataParallel(attached.model, device_ids=device_ids, broadcast_buffers=False)
        return self._wrapped, attached.params

    def save_checkpoint(self, out: Path, model: Any, optimizer: Any, scheduler: Any, at: TrainState, meta: dict, keep: int) -> None:
        from qlora_plugins.core.checkpointing import save_training_checkpoint

        if self.strategy == "fsdp":
            from qlora_plugins.core import fsdp

            model, optimizer = fsdp.consolidated(model, optimizer)  # every rank takes part
        if self.world.is_main:
            save_training_checkpoint(out, model, optimizer, scheduler, at, meta, keep)
        barrier()

    def restore_checkpoint(self, out: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[Path | None, TrainState | None]:
        from qlora_plugins.core.checkpointing import restore_latest

        if self.strategy == "fsdp":
            from qlora_plugins.core import fsdp

            found = fsdp.restore_latest_sharded(out, model, optimizer, scheduler, self.log)
        else:
            found = restore_latest(out, model, optimizer, scheduler, self.log)
        import torch.distributed as dist

        steps: list = [None] * self.world.world_size
        dist.all_gather_object(steps, found[1].step if found[1] is not None else None)
        if len(set(steps)) != 1:
            raise DistributedError(
                f"{option('resume')}: the ranks found different checkpoints in {out} (steps {steps}); on several machines "
                "the run directory must be one shared directory"
            )
        return found

    def save_and_export(self, prepared: Prepared, attached: Attached, run_dir: RunDirectory) -> tuple[dict, float]:
        if self.strategy == "fsdp":
            from qlora_plugins.core import fsdp

            trained = fsdp.full_trainable_state(attached.model)  # every rank takes part
            if not self.world.is_main:
                return {}, 0.0
            # exports need the whole model: rank 0 loads the base again (frozen, so identical) and
            # puts the trained weights in, then exports exactly as one process does
            attached.model = self._wrapped = None
            import gc

            gc.collect()
            self.log("Gathering the trained adapter on rank 0 for the exports")
            attached = self._gathered = self.attach(prepared, self.load(prepared))
            fsdp.load_trainable(attached.model, trained)
        if not self.world.is_main:
            return {}, 0.0
        return super().save_and_export(prepared, attached, run_dir)

    def evaluate(self, prepared: Prepared, attached: Attached) -> dict:
        """The ``eval`` section on rank 0 alone (after FSDP, on the model gathered for the exports)."""
        if not self.world.is_main:
            return {}
        return super().evaluate(prepared, self._gathered if self._gathered is not None else attached)

    def finish(self, report: RunReport, run_dir: RunDirectory) -> RunReport:
        import torch
        import torch.distributed as dist

        mine = {"rank": self.world.rank, "peak_rss_bytes": peak_rss_bytes()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mine["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        mine.update(getattr(self, "_base_bytes", {}))
        gathered: list = [None] * self.world.world_size
        dist.all_gather_object(gathered, mine)
        if not self.world.is_main:
            return report
        report.distributed = {
            "world_size": self.world.world_size,
            "strategy": self.strategy,
            "backend": self.backend,
            "global_batch_size": report_batch(self.config),
            "per_rank_batch_size": self.config.train.batch_size // self.world.world_size,
            "ranks": gathered,
        }
        report.memory["per_rank_peak_rss_bytes"] = [g["peak_rss_bytes"] for g in gathered]
        return super().finish(report, run_dir)

    def train(self, prepared: Prepared, attached: Attached, run_dir: RunDirectory, meta: dict) -> Any:
        from qlora_plugins.core.fsdp import resident_quantized_bytes

        trained = super().train(prepared, attached, run_dir, meta)
        self._base_bytes = {"base_weight_bytes": resident_quantized_bytes(attached.model)}  # this rank's share
        self._interrupt_save = None  # no checkpoint on an interrupt: the peers are stopping too
        return trained

    def _record_failure(self, report: RunReport, run_dir: RunDirectory, exc: BaseException) -> None:
        if self.world.is_main:
            self._interrupt_save = None
            if _is_peer_loss(exc) and not isinstance(exc, QloraError):
                exc = DistributedError("another rank failed (its error line names it); the last checkpoint is kept")
            super()._record_failure(report, run_dir, exc)


def report_batch(config: Any) -> int:
    """Examples of one optimizer step on all ranks together."""
    return config.train.batch_size * config.train.gradient_accumulation_steps


def _is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank went away."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistBackendError", ())) or isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("connection closed", "connection reset", "gloo", "nccl", "broken pipe")
    )


def die_with_launcher() -> None:
    """Under torchrun's agent (which starts each rank in a session of its own), let the kernel
    kill this rank when the agent dies: a SIGKILL of ``qlora run --nproc-per-node`` then stops
    the whole job instead of leaving ranks that go on writing. Linux only; elsewhere nothing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return
    if os.getppid() == 1:  # the agent died before the call
        os._exit(2)


def init_process_group(world: World, device: str) -> str:
    """Join the job's process group (``env://``): nccl on CUDA, gloo on CPU; return the backend."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        minutes = float(os.environ.get("QLORA_PLUGINS_DIST_TIMEOUT_MIN", "30"))
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {world.rank}: cannot join the process group ({backend}): {_first_line(exc)}") from None
    return backend


def run_worker(
    config: Any,
    registry: Any,
    output: Path | None,
    world: World,
    *,
    force: bool = False,
    resume: bool = False,
    log: Any = lambda m: None,
    progress: bool = True,
    debug: bool = False,
) -> dict | None:
    """Run this rank's part of a distributed job; rank 0 returns the report, the others None.

    Input errors refused before anything loads are reported by rank 0 alone (the others exit
    quietly with :class:`QuietExit`); a failure later names the rank.
    """
    import torch.distributed as dist

    from qlora_plugins.core import modeling
    from qlora_plugins.core.config import resolve_plugins

    try:
        plugins = resolve_plugins(config, registry)
        strategy = check_distributed(config, plugins, world.world_size)
        if strategy == NO_DISTRIBUTION:
            raise ConfigError("train.distributed", "none under a launcher; run qlora run without torchrun for one process")
        device = modeling.choose_device(config.train.device)
    except QloraError:
        if world.is_main:
            raise
        raise QuietExit("refused by rank 0") from None
    die_with_launcher()
    backend = init_process_group(world, device)
    pipeline: Any = None
    try:
        chosen = [str(output) if output is not None else None]
        dist.broadcast_object_list(chosen, src=0)  # every rank writes to (and resumes from) rank 0's choice
        if chosen[0] is None:
            raise ConfigError(option("output"), "name the run directory")
        pipeline = DistributedPipeline(
            config,
            registry,
            Path(chosen[0]),
            force=force,
            resume=resume,
            log=log if world.is_main else (lambda m: None),
            progress=progress and world.is_main,
            world=world,
            strategy=strategy,
        )
        pipeline.backend = backend
        report = pipeline.run().to_dict()
        return report if world.is_main else None
    except KeyboardInterrupt:
        raise
    except QuietExit:
        raise
    except BaseException as exc:
        if debug:
            raise
        if _is_peer_loss(exc) and not isinstance(exc, QloraError):
            raise QuietExit(f"rank {world.rank}: another rank stopped") from None
        if isinstance(exc, QloraError) and not world.is_main and not getattr(pipeline, "opened", False):
            raise QuietExit("refused by rank 0") from None  # input errors read the same on every rank
        text = _first_line(exc) if isinstance(exc, QloraError) else f"{type(exc).__name__}: {_first_line(exc)}"
        raise DistributedError(f"rank {world.rank}: {text}") from None
    finally:
        # the job is over for this rank: the agent's SIGTERM to the ranks still exiting must end
        # them quietly, not raise Terminated inside the interpreter's exit handlers
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


__all__: Sequence[str] = (
    "DistributedPipeline",
    "DistributedTrainLoop",
    "World",
    "check_distributed",
    "detect",
    "run_worker",
    "strategy_for",
)
