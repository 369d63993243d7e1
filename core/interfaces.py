"""The typed plugin interfaces: base classes that builtin and third-party plugins subclass.

A plugin class names itself (``name``), describes itself (``description`` or its docstring's
first line) and declares its options as an attrs class (``Options``), which the host builds from
the plugin's config section and validates before anything heavy runs. The host instantiates the
class with those options and calls the kind's methods.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import attrs

from qlora_plugins.core.options import in_range, positive
from qlora_plugins.core.planning import ActivationCoefficients, Architecture, LinearShape, StateBytes

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

TASKS = ("causal_lm", "seq_cls")


@attrs.define
class NoOptions:
    """Options class of a plugin that takes none."""


class Plugin:
    """Base of every plugin class.

    Class attributes a plugin sets:

    - ``name``: how configs refer to it (``quantizer: {name: nf4}``).
    - ``description``: one line for ``qlora plugins`` (defaults to the docstring's first line).
    - ``Options``: an ``@attrs.define`` class; the host builds it from the config section.
    - ``replaces``: set True to take over a name another plugin (e.g. a builtin) registered,
      or, with ``default``, the default of its kind.
    - ``default``: set True to be the plugin a config gets when it omits the section (or its
      ``name``). The first registered class of a kind that sets it is the default (builtins
      register first); a later one takes the default over only if it also sets ``replaces``.
      It is not inherited: a subclass of a default plugin sets it again to be a default.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    replaces: ClassVar[bool] = False
    default: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        """The one-line description shown by ``qlora plugins``."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


# --- quantizers ----------------------------------------------------------------------------


@attrs.define
class ModelRequest:
    """What the pipeline asks a quantizer to load.

    :param path: a transformers checkpoint directory.
    :param task: ``causal_lm`` or ``seq_cls``.
    :param auto_class: the transformers Auto class for the task.
    :param dtype: dtype of the weights that stay in full precision (and the compute dtype).
    :param device: ``cpu`` or ``cuda``.
    :param trust_remote_code: passed to transformers only when the config says so.
    :param model_kwargs: extra ``from_pretrained`` arguments (e.g. ``num_labels``).
    :param skip_modules: module names never quantized (output heads).
    :param frozen_dtype: if set (a 16-bit dtype), frozen unquantized Embedding/Linear weights are
        stored in it while computing in ``dtype`` (``model.frozen_dtype``; :mod:`qlora_plugins.core.frozen`).
    """

    path: Path
    task: str
    auto_class: Any
    dtype: Any
    device: str = "cpu"
    trust_remote_code: bool = False
    model_kwargs: dict = attrs.field(factory=dict)
    skip_modules: list = attrs.field(factory=list)
    frozen_dtype: Any = None

    def load_full_precision(self, **extra: Any) -> "nn.Module":
        """Load the checkpoint unquantized, in ``dtype``, on ``device``.

        :raises ModelError: when weights of the model are missing from the checkpoint or the
            checkpoint holds weights the model has no place for (``config.json`` describes
            another architecture).
        """
        from qlora_plugins.core.modeling import check_loading_info

        kwargs = {**self.model_kwargs, **extra}
        kwargs.setdefault("dtype", self.dtype)
        model, info = self.auto_class.from_pretrained(
            str(self.path), trust_remote_code=self.trust_remote_code, output_loading_info=True, **kwargs
        )
        # every weight of the model must come from the checkpoint (a mismatched config.json would
        # otherwise train a randomly initialised model); a classification head may be new
        check_loading_info(info, self.path, type(model).__name__, new_head=self.task == "seq_cls")
        return model.to(self.device)


@attrs.define
class Footprint:
    """How many parameters a quantizer stored in low precision and the bytes they take
    (packed weights plus every quantization constant)."""

    quantized_params: int = 0
    quantized_bytes: int = 0

    @property
    def bits_per_param(self) -> float | None:
        """Storage bits per quantized parameter (4.5 for NF4 at blocksize 64, 4.127 with DQ)."""
        if not self.quantized_params:
            return None
        return 8.0 * self.quantized_bytes / self.quantized_params


class Quantizer(Plugin):
    """A way to load a model with (some of) its linear weights in low precision."""

    kind: ClassVar[str] = "quantizer"

    def load_model(self, request: ModelRequest) -> "nn.Module":
        """Return the model described by ``request`` with its linear weights quantized.

        The default loads full precision and calls :meth:`quantize_model`; quantizers that plug into
        ``from_pretrained`` (bitsandbytes) or stream a checkpoint override this.
        """
        model = request.load_full_precision()
        self.quantize_model(model, request.skip_modules)
        return model

    def quantize_model(self, model: "nn.Module", skip_modules: Sequence[str]) -> None:
        """Quantize ``model``'s linear layers in place, except those named in ``skip_modules``."""
        raise NotImplementedError(f"quantizer {self.name!r} does not implement quantize_model")

    def footprint(self, model: "nn.Module") -> Footprint:
        """Count the parameters this quantizer stored in low precision and their bytes."""
        return Footprint()

    def metadata(self) -> dict:
        """Facts for the run report (format, blocksize, double quantization, backend...)."""
        return {}

    def sharding_refusal(self) -> str | None:
        """Why the model this quantizer loads cannot be sharded by FSDP (``train.distributed:
        fsdp``), as ``"option: reason"`` naming the option at fault; None when it can. FSDP shards
        every parameter and the packed tensors of :class:`~qlora_plugins.quantized.QuantLinear`
        layers (docs/distributed.md), so the default is None; a quantizer whose layers keep state
        FSDP cannot see (bitsandbytes' ``QuantState``) says so here, before anything loads."""
        return None

    # --- planning (``qlora plan``) ------------------------------------------------------------

    def planned_bytes(self, numel: int) -> tuple[int, int] | None:
        """How this quantizer, with its options, stores one linear weight of ``numel`` parameters:
        ``(packed payload bytes, constant bytes)`` (codes; scales, offsets and any
        double-quantization state), or None when it keeps weights in full precision (the model
        dtype). The answer must not depend on anything but ``numel`` and the options.

        The default raises ``NotImplementedError``: the planner then refuses the quantizer with
        one line naming it."""
        raise NotImplementedError(f"quantizer {self.name!r} does not declare planned_bytes")

    def planned_encode_bytes(self, numel: int, dtype_bytes: int) -> float:
        """Bytes quantizing one weight of ``numel`` parameters (held in a dtype of
        ``dtype_bytes`` bytes) allocates on top of that weight, its codes included: the planner's
        loading peak. The default, 0, counts nothing."""
        return 0.0

    def planned_label(self) -> str:
        """A few words for the plan's base-weights row and settings line (the builtin blockwise
        formats say ``nf4 + DQ, blocksize 64``). The default is the name."""
        return self.name

    def planned_variants(self) -> Sequence[tuple[str, "Quantizer"]]:
        """``(label, quantizer)`` pairs: this quantizer with the option values worth comparing in
        the plan's table of base weights (e.g. with and without double quantization). The planner
        also suggests a variant that stores the model in fewer bytes when a plan does not fit.
        The default is the quantizer itself under its name."""
        return [(self.name, self)]


# --- adapters ------------------------------------------------------------------------------


@attrs.define
class AdapterContext:
    """What the pipeline tells an adapter about the model it wraps.

    :param task: ``causal_lm`` or ``seq_cls``.
    :param quantized: whether the base model's linear weights are quantized.
    """

    task: str
    quantized: bool


@attrs.define
class MergeTarget:
    """A layer whose weight an adapter changes, for exporters that merge the adapter into plain
    weights (``merged``, ``merged_4bit``).

    :param name: the layer's module name in the model :meth:`Adapter.unwrap` returns.
    :param base_layer: the frozen layer the adapter wraps (QuantLinear, a bitsandbytes 4-bit
        layer, or a plain ``nn.Linear``/``Conv1D``).
    :param delta: the adapter's change of the weight (fp32, in the layout of the base layer's
        dequantized weight: ``(out, in)`` for linear layers); None when it changes nothing.
    """

    name: str
    base_layer: Any
    delta: Any = None


@attrs.define
class SavedAdapter:
    """What an adapter saved by :meth:`Adapter.save` records about itself.

    :param base_model: the base model it was trained on (a path or id), if recorded.
    :param num_labels: the number of labels of a saved classification head, if any.
    """

    base_model: Optional[str] = None
    num_labels: Optional[int] = None


class Adapter(Plugin):
    """Makes a small set of weights trainable on top of a frozen (quantized) base model.

    ``needs_full_precision_base``: set True when the adapter trains the base weights themselves
    (4-bit codes cannot be trained); the planner then refuses a quantizer that quantizes.
    """

    kind: ClassVar[str] = "adapter"
    needs_full_precision_base: ClassVar[bool] = False

    def attach(self, model: "nn.Module", context: AdapterContext) -> "nn.Module":
        """Return the model with the adapter attached; only adapter weights require grad."""
        raise NotImplementedError

    def save(self, model: "nn.Module", directory: Path) -> None:
        """Write the trained adapter into ``directory`` (an empty directory) in its own format."""
        raise NotImplementedError

    def load(self, model: "nn.Module", directory: Path, context: AdapterContext) -> "nn.Module":
        """Return ``model`` with the adapter saved by :meth:`save` in ``directory`` attached."""
        raise NotImplementedError

    def swap_in(self, model: "nn.Module", directory: Path) -> "AbstractContextManager[nn.Module]":
        """Optional: a context manager that makes the adapter saved in ``directory`` the active
        one on ``model`` (the model :meth:`attach` or :meth:`load` returned, whose base is
        already in memory) and yields the model; on exit the trained adapter is active again and
        the model is as it was.

        The export fidelity check uses it to reload an adapter artifact without loading a second
        copy of the base model (which would double a large model's peak memory). Raise
        ``NotImplementedError`` (the default) when the adapter cannot: the check then loads a
        fresh base model and calls :meth:`load`."""
        raise NotImplementedError

    def merge_targets(self, model: "nn.Module") -> list[MergeTarget]:
        """The layers whose weights this adapter changes, and by how much (see
        :class:`MergeTarget`), for exporters that merge it into plain weights. ``model`` is the
        trained model or a copy of it. Default: none, for an adapter that changes no frozen
        layer (full fine-tuning trains the model's own weights)."""
        return []

    def unwrap(self, model: "nn.Module") -> "nn.Module":
        """The plain model inside ``model`` with the adapter's wrappers removed and nothing
        merged; :attr:`MergeTarget.name` names its modules. Default: ``model`` itself."""
        return model

    def saved_info(self, directory: Path) -> SavedAdapter:
        """What the adapter saved in ``directory`` records (base model, classification head size),
        used by ``qlora export`` to refuse an adapter of another model. Default: nothing."""
        return SavedAdapter()

    # --- planning (``qlora plan``) ------------------------------------------------------------

    def planned_trainable(self, layers: Sequence[LinearShape], arch: Architecture) -> int:
        """How many parameters this adapter, with its options, trains on a model of architecture
        ``arch`` whose linear layers (output heads excluded) are ``layers``.

        The default raises ``NotImplementedError``: the planner then refuses the adapter with one
        line naming it."""
        raise NotImplementedError(f"adapter {self.name!r} does not declare planned_trainable")

    def planned_weight_bytes(self, trainable: int, dtype_bytes: int) -> tuple[float, float]:
        """``(weight bytes, gradient bytes)`` of ``trainable`` trained parameters in a model whose
        dtype has ``dtype_bytes`` bytes: weight bytes are what the adapter adds next to the base
        (0 when it trains the base weights themselves). The default is fp32 weights and
        gradients beside the base: ``(4 * trainable, 4 * trainable)``."""
        return 4 * trainable, 4 * trainable

    def planned_activations(self, compute_dtype: str, dtype_bytes: int) -> ActivationCoefficients:
        """Bytes saved for backward per token and per decoder layer when training with this
        adapter in ``compute_dtype`` (``float32`` or ``bfloat16``; the model dtype has
        ``dtype_bytes`` bytes), without gradient checkpointing.

        The default raises ``NotImplementedError``: the planner then refuses the adapter with one
        line naming it."""
        raise NotImplementedError(f"adapter {self.name!r} does not declare planned_activations")

    def planned_label(self) -> str:
        """A few words for the plan's trainable-weights row (e.g. ``LoRA adapters (r=16, fp32)``).
        The default names the adapter."""
        return f"trainable weights ({self.name})"


# --- optimizers ----------------------------------------------------------------------------


@attrs.define
class OptimizerOptions:
    """Options every optimizer accepts."""

    lr: float = attrs.field(default=2e-4, validator=positive)
    weight_decay: float = attrs.field(default=0.0, validator=in_range(0.0, None))
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.999])
    eps: float = attrs.field(default=1e-8, validator=positive)

    @betas.validator
    def _check_betas(self, attribute: attrs.Attribute, value: list) -> None:
        if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"must be two numbers in [0, 1), got {value!r}", attribute)


class Optimizer(Plugin):
    """Creates the torch optimizer that updates the trainable (adapter) weights."""

    kind: ClassVar[str] = "optimizer"
    Options: ClassVar[type] = OptimizerOptions
    #: Whether the optimizer works on parameters sharded by FSDP (``DTensor`` parameters, plain
    #: elementwise updates); ``train.distributed: fsdp`` refuses an optimizer that does not say so.
    shardable: ClassVar[bool] = False

    def create(self, params: list["torch.nn.Parameter"], device: "torch.device") -> "torch.optim.Optimizer":
        """Return an optimizer over ``params`` for a model on ``device``."""
        raise NotImplementedError

    def runtime_note(self, device: "torch.device") -> str | None:
        """A line for the report when the optimizer behaves differently on ``device``
        (e.g. paging is CUDA-only)."""
        return None

    def planned_state_bytes(self, trainable: int, device: str) -> StateBytes:
        """Where the states (and any host copies) for ``trainable`` fp32 parameters live when
        training on ``device`` (``cuda`` or ``cpu``; on a CPU the planner counts device and
        host bytes as host memory).

        The default raises ``NotImplementedError``: the planner then refuses the optimizer with
        one line naming it."""
        raise NotImplementedError(f"optimizer {self.name!r} does not declare planned_state_bytes")


# --- exporters -----------------------------------------------------------------------------


@attrs.define
class ExportContext:
    """Everything an exporter may need about the trained model.

    :param model: the trained model (quantized base + adapter), in eval mode.
    :param tokenizer: the tokenizer of the base model.
    :param base_model_path: the base checkpoint directory.
    :param task: ``causal_lm`` or ``seq_cls``.
    :param quantizer: the quantizer plugin instance that loaded the base.
    :param adapter: the adapter plugin instance that was trained.
    :param config: the resolved run config (plain mapping).
    :param model_request: how the base model was loaded (to load it again).
    :param probe_examples: tokenized held-out examples (``input_ids``, ``labels``) for fidelity checks.
    """

    model: Any
    tokenizer: Any
    base_model_path: Path
    task: str
    quantizer: Quantizer
    adapter: Adapter
    config: dict
    model_request: ModelRequest
    probe_examples: Sequence[dict] = ()


#: Tolerance of an exporter that declares none: mean KL at most 1e-3 nats, top-1 agreement at least 98%.
GENERIC_TOLERANCE = {"max_kl": 1e-3, "min_top1": 0.98}


@attrs.define
class ExportCheck:
    """What an exporter can check before anything is loaded or trained (:meth:`Exporter.check`).

    :param task: ``causal_lm`` or ``seq_cls``.
    :param quantizer: the quantizer plugin instance the run uses.
    :param adapter: the adapter plugin instance the run uses.
    :param base_model_path: the base checkpoint directory (None while a ``model.source`` is not
        materialized yet).
    :param config_path: dotted config path of the exporter's section, for error messages.
    """

    task: str
    quantizer: Quantizer
    adapter: Adapter
    base_model_path: Optional[Path] = None
    config_path: str = "export"


class Exporter(Plugin):
    """Writes a trained model out in some shippable format.

    The host calls :meth:`check` before anything is loaded, :meth:`export` into an empty
    temporary directory after training, then :meth:`reload` and :meth:`verify` to measure the
    artifact's fidelity against :meth:`default_tolerance` (overridden by the ``tolerance``
    option), writes ``manifest.json`` and renames the directory into place."""

    kind: ClassVar[str] = "exporter"

    def check(self, context: ExportCheck) -> None:
        """Refuse, before hours of training, a run whose artifact this exporter cannot write
        (a missing signing key, an incompatible quantizer): raise ``ConfigError`` or
        ``ExportError``. Default: accept."""

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        """Write the artifact into ``output_dir`` (empty; the host renames it into place when this
        returns). Return facts for the manifest (format, dtype, ...); facts named like the host's
        own keys (``exporter``, ``path``, ``files``, ``bytes``, ``seconds``, ``fidelity``) are
        ignored."""
        raise NotImplementedError

    def reload(self, directory: Path, context: ExportContext) -> Any:
        """The model the artifact in ``directory`` holds, loaded back from disk (or a context
        manager yielding it), for the fidelity check; None when it holds nothing loadable.
        Default: a checkpoint directory (``config.json``: plain transformers, bitsandbytes 4-bit
        or qlora_plugins 4-bit) is loaded; anything else is None."""
        if (Path(directory) / "config.json").is_file():
            from qlora_plugins.core.checkpoint_format import load_model_checkpoint
            from qlora_plugins.core.exporting.runner import current_registry

            return load_model_checkpoint(directory, context.task, current_registry(), device=context.model_request.device)
        return None

    def verify(self, directory: Path, context: ExportContext) -> dict:
        """Fidelity figures of the exporter's own (e.g. tensor-level errors), added to the logit
        comparison and checked against the tolerance like them. Default: none."""
        return {}

    def default_tolerance(self) -> dict:
        """Limits on the fidelity figures (``max_kl``, ``min_top1``, ``max_abs_diff``, ...) when
        the ``tolerance`` option does not set them. Default: :data:`GENERIC_TOLERANCE`."""
        return dict(GENERIC_TOLERANCE)


# --- data ----------------------------------------------------------------------------------


@attrs.define
class DataOptions:
    """Options every data format accepts. ``path`` is relative to the config file's directory.

    The host itself reads two more keys of the ``data`` section, for every data format:
    ``packing`` and ``sources`` (core/mixing.py); they never reach a format's options.

    ``num_proc`` (worker processes for tokenizing; default: the cores, for files of 32 MiB or
    more) and ``cache`` (keep the tokenized set in ``$QLORA_PLUGINS_HOME/data``) are read by
    formats built on :func:`qlora_plugins.data.tokenize_cached`.
    """

    path: str
    eval_fraction: float = attrs.field(default=0.1, validator=in_range(0.0, 0.9))
    max_length: int = attrs.field(default=256, validator=in_range(8, 1_000_000))
    max_examples: Optional[int] = attrs.field(default=None, validator=positive)
    min_kept_fraction: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0))
    num_proc: Optional[int] = attrs.field(default=None, validator=positive)
    cache: bool = True


@attrs.define
class DataContext:
    """What a data format gets to build its splits.

    :param tokenizer: the base model's tokenizer.
    :param task: ``causal_lm`` or ``seq_cls``.
    :param seed: the run's seed (for the train/eval split).
    :param base_dir: directory that relative paths are resolved against.
    :param config_path: dotted config path of the data section, for error messages.
    """

    tokenizer: Any
    task: str
    seed: int
    base_dir: Path
    config_path: str = "data"


@attrs.define
class DataSplits:
    """Tokenized examples: sequences of dicts with ``input_ids`` and ``labels``
    (token labels with -100 for masked positions, or a class index for ``seq_cls``).

    ``train`` and ``eval`` may be plain lists of dicts, or any ``Sequence`` of dicts with ``len``,
    integer indexing and slicing that returns a list: :class:`qlora_plugins.data.Examples` over
    a memory-mapped Arrow dataset is what the builtin formats return.

    :param rows: how many rows the data file gave (after ``max_examples``), when the format
        reads rows; None otherwise.
    :param dropped: rows that were read but yield no example (e.g. the prompt alone fills
        ``max_length``), for the run's summary and report.
    :param truncated: kept examples that were cut to ``max_length``, when the format counts
        them (``qlora data preview`` reports it); None when it does not say.
    :param sources: when the host mixes several files (``data.sources``), each source's
        figures and share of the training examples and tokens; None otherwise.
    """

    train: Sequence[dict]
    eval: Sequence[dict]
    num_labels: Optional[int] = None
    rows: Optional[int] = None
    dropped: int = 0
    truncated: Optional[int] = None
    sources: Optional[list] = None


class DataFormat(Plugin):
    """Turns local data files into tokenized training and evaluation examples."""

    kind: ClassVar[str] = "data_format"
    Options: ClassVar[type] = DataOptions
    tasks: ClassVar[tuple[str, ...]] = TASKS
    # --- issue 14, generate/eval branch ---
    #: True for a format whose examples are conversations rendered with the tokenizer's chat
    #: template: ``qlora generate``/``chat``/``eval`` then apply the template to its runs' prompts.
    conversational: ClassVar[bool] = False
    # --- end generate/eval ---

    def load(self, context: DataContext) -> DataSplits:
        """Read, validate and tokenize the data; raise DataError naming the file on bad input.

        A format built for large files tokenizes through :func:`qlora_plugins.data.tokenize_cached`
        (batched, parallel, cached, memory-mapped) and returns
        :class:`qlora_plugins.data.Examples`; returning lists of dicts stays supported."""
        raise NotImplementedError

    def check(self, base_dir: Path, config_path: str = "data") -> None:
        """Cheap checks without a tokenizer (used by ``qlora validate``): the file exists, etc."""

    def input_paths(self, base_dir: Path) -> list[Path]:
        """The files (or directories) this format reads. The host never replaces or deletes a
        directory that holds one of them (``--force`` on a run directory that contains the data).
        The default is the ``path`` option, relative to ``base_dir``."""
        path = getattr(self.options, "path", None)
        return [Path(base_dir) / path] if isinstance(path, str) and path else []


# --- model sources -------------------------------------------------------------------------


class ModelSource(Plugin):
    """A named model the tool can create on demand (``model.source``), cached as an ordinary
    transformers checkpoint directory."""

    kind: ClassVar[str] = "model_source"
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "causal_lm"

    def materialize(self, directory: Path) -> None:
        """Write the checkpoint (config, weights, tokenizer) into the empty ``directory``."""
        raise NotImplementedError


# --- evaluators (issue 14: evaluation as a plugin kind) -------------------------------------


@attrs.define
class EvalContext:
    """One model for an :class:`Evaluator` to measure.

    :param model: the model, in eval mode: the fine-tuned one (quantized base + adapter, or a
        merged export), the base model with the adapter disabled, or a plain model directory.
    :param tokenizer: its tokenizer.
    :param device: ``cpu`` or ``cuda`` (where the model's parameters are).
    :param task: ``causal_lm`` or ``seq_cls``.
    :param label: which model this is: ``fine_tuned``, ``base`` or ``model``.
    :param chat: True when prompts should be rendered with the tokenizer's chat template (the
        run trained on conversations and the tokenizer has a template).
    :param base_dir: directory that relative paths in the evaluator's options resolve against
        (the config file's directory in an ``eval`` section, the current directory for ``qlora eval``).
    :param seed: the run's seed (for evaluators that sample).
    :param config_path: where the evaluator's options came from (``eval[0]``, ``--evaluator NAME``),
        for error messages.
    """

    model: Any
    tokenizer: Any
    device: str
    task: str
    label: str
    chat: bool = False
    base_dir: Path = attrs.field(factory=Path.cwd)
    seed: int = 0
    config_path: str = "eval"


class Evaluator(Plugin):
    """Measures a model: perplexity on a held-out file, a benchmark harness, a task of your own.

    The host calls :meth:`check` before anything is loaded (``qlora eval``, and before training
    for a config's ``eval`` section), then :meth:`evaluate` once per model (the base model with
    the adapter disabled, then the fine-tuned one), and prints the figures side by side."""

    kind: ClassVar[str] = "evaluator"
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm",)

    def check(self, base_dir: Path, config_path: str = "eval") -> None:
        """Cheap checks without a model (files exist, optional libraries are installed): raise
        ``ConfigError``/``EvaluationError`` naming ``config_path``. Default: accept."""

    def evaluate(self, context: EvalContext) -> dict:
        """Measure ``context.model`` and return its figures: a flat mapping of metric name to a
        number (``{"perplexity": 12.3, "tokens": 4096}``); other JSON values are kept in the
        report but not shown in the table. Raise ``EvaluationError`` for bad input."""
        raise NotImplementedError

    def input_paths(self, base_dir: Path) -> list[Path]:
        """The files this evaluator reads (a ``--force`` run never replaces a directory holding
        one). Default: the ``path`` option, relative to ``base_dir``, when there is one."""
        path = getattr(self.options, "path", None)
        return [Path(base_dir) / path] if isinstance(path, str) and path else []


# --- end of evaluators ----------------------------------------------------------------------
# --- trackers (issue 14: tracker plugin kind) ----------------------------------------------


@attrs.define
class TrackerContext:
    """What a tracker learns about the run when it is opened.

    :param run_dir: the run directory.
    :param directory: ``run_dir/tracking/<tracker name>``, where a tracker that writes files
        writes them (not created; the run directory's ``--force`` rules cover ``tracking/``).
    :param config: the resolved run config (what ``config.yaml`` holds).
    :param resumed_step: on ``--resume``, the step training continues from (records of later
        steps were discarded with the checkpoint); None for a new run.
    :param run_name: a name for the run (the run directory's name).
    """

    run_dir: Path
    directory: Path
    config: dict
    resumed_step: Optional[int] = None
    run_name: str = ""


class Tracker(Plugin):
    """Receives the training metrics: every record that goes to ``metrics.jsonl`` (train steps
    with ``step``, ``loss``, ``lr``, ...; evaluations with ``step``, ``eval_loss``, ...).

    The host calls :meth:`open` once, :meth:`log` per record and :meth:`close` once, on the
    process that writes the metrics. A tracker that raises is reported once and disabled (the
    run goes on), unless it sets ``essential = True`` (the run directory's own record, whose
    failure fails the run).
    """

    kind: ClassVar[str] = "tracker"
    essential: ClassVar[bool] = False

    def open(self, context: TrackerContext) -> None:
        """Start tracking the run (import the client library here, not at module import)."""

    def log(self, record: dict) -> None:
        """One metrics record; its ``step`` is the optimizer step it belongs to."""
        raise NotImplementedError

    def close(self, status: str) -> None:
        """End of the run: ``status`` is ``completed``, ``failed`` or ``interrupted``."""


# --- end of trackers -------------------------------------------------------------------------


KINDS: dict[str, type[Plugin]] = {
    "quantizer": Quantizer,
    "adapter": Adapter,
    "optimizer": Optimizer,
    "exporter": Exporter,
    "data_format": DataFormat,
    "model_source": ModelSource,
    # --- issue 14, generate/eval branch: evaluators ---
    "evaluator": Evaluator,
    # --- end evaluators ---
    # --- trackers (issue 14) ---
    "tracker": Tracker,
    # --- end of trackers ---
}
