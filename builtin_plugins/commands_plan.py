"""Builtin command ``qlora plan``: predict memory before loading anything (added through the
public ``register_commands(cli)`` hook, like a third party would)."""

from __future__ import annotations

import json

import click

from qlora_plugins import hookimpl


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from qlora_plugins.errors import ConfigError
    from qlora_plugins.planning import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:  # one `Error: --device-memory: ...` line, like every input error
        raise ConfigError(f"--{param.name.replace('_', '-')}", str(exc)) from None


#: Ranges of the numeric options (the blocksize and the quantizer are checked by the planner).
RANGES = {"--batch": (1, 1_000_000), "--seq": (1, 10_000_000), "--lora-r": (1, 4096), "--lora-dropout": (0.0, 0.99)}

#: Which plugin option each flag sets: (kind, option key). A flag applies to the plugins whose
#: options class has the key (e.g. ``--blocksize`` to the blockwise quantizers, ``--lora-r`` to
#: lora); given explicitly for a plugin without it, it is refused.
PLUGIN_FLAGS = {
    "--double-quant": ("quantizer", "double_quant"),
    "--blocksize": ("quantizer", "blocksize"),
    "--lora-r": ("adapter", "r"),
    "--lora-dropout": ("adapter", "dropout"),
    "--target-modules": ("adapter", "target_modules"),
}


def _option_keys(registry, kind: str, name: str | None) -> set[str] | None:
    """The option keys of plugin ``name`` (None: the kind's default); None when unknown (the
    planner then reports the name)."""
    import attrs

    name = name if name is not None else registry.default(kind)
    try:
        cls = registry.get(kind, name)
    except Exception:  # noqa: BLE001 - unknown names are the planner's error to report
        return None
    return {f.alias or f.name for f in attrs.fields(cls.Options) if f.init}


def plan_settings(
    registry,
    *,
    quantizer: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: str = "float32",
    adapter: str | None = None,
    lora_r: int = 16,
    lora_dropout: float = 0.05,
    targets: list[str] | None = None,
    optimizer: str | None = None,
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
    device: str = "cuda",
    explicit: tuple[str, ...] = (),
    world_size: int = 1,
    strategy: str = "none",
):
    """Planner settings from ``qlora plan``'s flags: plugins by name (None: the registry's
    default of the kind), each flag of :data:`PLUGIN_FLAGS` passed as an option to the plugins
    that have it. ``explicit`` lists the flags the user gave: one that the plugin lacks is an
    error naming the flag. Option errors name the flag (``--lora-r: must be in [1, 4096]``)."""
    from qlora_plugins import planning as planner
    from qlora_plugins.errors import ConfigError

    values = {
        "--double-quant": double_quant,
        "--blocksize": blocksize,
        "--lora-r": lora_r,
        "--lora-dropout": lora_dropout,
        "--target-modules": "all-linear" if targets is None else list(targets),
    }
    names = {"quantizer": quantizer, "adapter": adapter}
    options: dict[str, dict] = {"quantizer": {}, "adapter": {}}
    for flag, (kind, key) in PLUGIN_FLAGS.items():
        keys = _option_keys(registry, kind, names[kind])
        if keys is not None and key in keys:
            options[kind][key] = values[flag]
        elif flag in explicit and keys is not None:
            shown = names[kind] or registry.default(kind)
            raise ConfigError(flag, f"{kind} '{shown}' has no option '{key}'")
    by_key = {f"{kind}.{key}": flag for flag, (kind, key) in PLUGIN_FLAGS.items()}
    try:
        return planner.Settings.from_names(
            registry,
            quantizer=quantizer,
            quantizer_options=options["quantizer"],
            adapter=adapter,
            adapter_options=options["adapter"],
            optimizer=optimizer,
            dtype=dtype,
            batch=batch,
            seq=seq,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            world_size=world_size,
            strategy=strategy,
        )
    except ConfigError as exc:
        if exc.path in by_key:
            raise ConfigError(by_key[exc.path], exc.message) from None
        raise


@click.command("plan")
@click.argument("model")
@click.option(
    "--quantizer",
    default=None,
    help="A registered quantizer: nf4, fp4, int4_sym, int4_asym, none, or a plugin's (default: the default quantizer, nf4).",
)
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="Double-quantize the per-block constants.")
@click.option("--blocksize", default=64, show_default=True, type=int, help="Quantization block size.")
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="model.dtype: unquantized weights and compute.",
)
@click.option(
    "--adapter",
    default=None,
    help="A registered adapter: lora, full (full fine-tuning), or a plugin's (default: the default adapter, lora).",
)
@click.option("--lora-r", default=16, show_default=True, type=int, help="LoRA rank.")
@click.option("--lora-dropout", default=0.05, show_default=True, type=float, help="LoRA dropout (dropout stores more activations).")
@click.option(
    "--target-modules", default="all-linear", show_default=True, help="all-linear or comma-separated layer names (q_proj,v_proj)."
)
@click.option(
    "--optimizer",
    default=None,
    help="A registered optimizer: adamw, paged_adamw, adamw_8bit, offload_adamw, "
    "or a plugin's (default: the default optimizer, paged_adamw).",
)
@click.option("--batch", default=1, show_default=True, type=int, help="Micro-batch size.")
@click.option("--seq", "--seq-len", "seq", default=512, show_default=True, type=int, help="Sequence length.")
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=True,
    show_default=True,
    help="Plan with gradient checkpointing (both are shown under activations).",
)
@click.option(
    "--device",
    default="cuda",
    show_default=True,
    type=click.Choice(["cuda", "cpu"]),
    help="Where training runs (on cpu, device memory is host memory).",
)
@click.option("--device-memory", callback=_size, metavar="SIZE", help="Device budget, e.g. 24GB (10^9) or 24GiB (2^30).")
@click.option("--host-memory", callback=_size, metavar="SIZE", help="Host RAM budget, e.g. 64GB.")
@click.option("--revision", default=None, help="With a Hugging Face Hub id: the branch, tag or commit (default: the default branch).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (bytes) instead of the tables.")
@click.option("--world-size", default=1, show_default=True, type=click.IntRange(1, 65536), help="Processes (ranks); the plan is per rank.")
@click.option(
    "--strategy",
    default=None,
    type=click.Choice(["ddp", "fsdp"]),
    help="How the ranks share the model (default with --world-size > 1: ddp); --batch is the global micro-batch.",
)
@click.pass_context
def plan_command(
    ctx: click.Context,
    model: str,
    quantizer: str | None,
    double_quant: bool,
    blocksize: int,
    dtype: str,
    adapter: str | None,
    lora_r: int,
    lora_dropout: float,
    target_modules: str,
    optimizer: str | None,
    batch: int,
    seq: int,
    gradient_checkpointing: bool,
    device: str,
    device_memory: float | None,
    host_memory: float | None,
    revision: str | None,
    as_json: bool,
    world_size: int,
    strategy: str | None,
) -> None:
    """Predict the memory of fine-tuning MODEL before anything is loaded.

    MODEL is a checkpoint directory (its config.json and safetensors headers are read, no
    weights), a config.json file, a Hugging Face Hub id org/name (its config.json from the
    Hugging Face cache, downloaded alone when missing; HF_HUB_OFFLINE honoured), or a preset:
    llama-2-7b, llama-2-13b, llama-2-70b, mistral-7b.

    Prints base weights per quantizer (with and without double quantization), quantization
    constants, adapters, their gradients, optimizer states (device, or host when paged or
    offloaded), activations with and without gradient checkpointing, and device and host totals.
    Any registered quantizer, adapter or optimizer that declares the planner's methods can be
    planned (docs/plugins.md). With --device-memory / --host-memory it says whether the plan fits
    and, if not, what would.
    """
    from click.core import ParameterSource

    from qlora_plugins import planning as planner
    from qlora_plugins.errors import ConfigError
    from qlora_plugins.options import check_range

    for option, value in zip(RANGES, (batch, seq, lora_r, lora_dropout)):
        check_range(option, value, *RANGES[option])
    registry = (ctx.find_object(dict) or {}).get("registry")
    if registry is None:
        from qlora_plugins.api import create_registry

        registry = create_registry()
    arch = planner.load_architecture(model, revision)
    targets = None if target_modules.strip() == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    params = {
        "--double-quant": "double_quant",
        "--blocksize": "blocksize",
        "--lora-r": "lora_r",
        "--lora-dropout": "lora_dropout",
        "--target-modules": "target_modules",
    }
    explicit = tuple(flag for flag, param in params.items() if ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE)
    settings = plan_settings(
        registry,
        quantizer=quantizer,
        double_quant=double_quant,
        blocksize=blocksize,
        dtype=dtype,
        adapter=adapter,
        lora_r=lora_r,
        lora_dropout=lora_dropout,
        targets=targets,
        optimizer=optimizer,
        batch=batch,
        seq=seq,
        gradient_checkpointing=gradient_checkpointing,
        device=device,
        explicit=explicit,
        world_size=world_size,
        strategy=strategy or ("ddp" if world_size > 1 else "none"),
    )
    if targets is not None:
        known = {lin.name for lin in arch.linears}
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ConfigError("--target-modules", f"{', '.join(unknown)} not in the model's linear layers ({', '.join(sorted(known))})")
    plan = planner.make_plan(arch, settings)
    budget = None
    if device_memory is not None or host_memory is not None:
        budget = planner.check_budget(arch, settings, device_memory, host_memory)
    if as_json:
        data = planner.plan_dict(plan, budget)
        data["budgets"] = {"device_bytes": device_memory, "host_bytes": host_memory}
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(planner.format_plan(plan, budget, {"device": device_memory, "host": host_memory}))


@hookimpl
def register_commands(cli):
    cli.add_command(plan_command)
