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
    - ``replaces``: set True to take over a name another plugin (e.g. a builtin) registered.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    replaces: ClassVar[bool] = False

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
        """Load the checkpoint unquantized, in ``dtype``, on ``device``."""
        kwargs = {**self.model_kwargs, **extra}
        kwargs.setdefault("dtype", self.dtype)
        model = self.auto_class.from_pretrained(
            str(self.path), trust_remote_code=self.trust_remote_code, **kwargs
        )
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


# --- adapters ------------------------------------------------------------------------------


@attrs.define
class AdapterContext:
    """What the pipeline tells an adapter about the model it wraps.

    :param task: ``causal_lm`` or ``seq_cls``.
    :param quantized: whether the base model's linear weights are quantized.
    """

    task: str
    quantized: bool


class Adapter(Plugin):
    """Makes a small set of weights trainable on top of a frozen (quantized) base model."""

    kind: ClassVar[str] = "adapter"

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

    def create(self, params: list["torch.nn.Parameter"], device: "torch.device") -> "torch.optim.Optimizer":
        """Return an optimizer over ``params`` for a model on ``device``."""
        raise NotImplementedError

    def runtime_note(self, device: "torch.device") -> str | None:
        """A line for the report when the optimizer behaves differently on ``device``
        (e.g. paging is CUDA-only)."""
        return None


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


class Exporter(Plugin):
    """Writes a trained model out in some shippable format."""

    kind: ClassVar[str] = "exporter"

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        """Write the artifact into ``output_dir`` (empty; the host renames it into place when this
        returns). Return facts for the manifest (format, dtype, ...)."""
        raise NotImplementedError


# --- data ----------------------------------------------------------------------------------


@attrs.define
class DataOptions:
    """Options every data format accepts. ``path`` is relative to the config file's directory."""

    path: str
    eval_fraction: float = attrs.field(default=0.1, validator=in_range(0.0, 0.9))
    max_length: int = attrs.field(default=256, validator=in_range(8, 1_000_000))
    max_examples: Optional[int] = attrs.field(default=None, validator=positive)


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
    (token labels with -100 for masked positions, or a class index for ``seq_cls``)."""

    train: Sequence[dict]
    eval: Sequence[dict]
    num_labels: Optional[int] = None


class DataFormat(Plugin):
    """Turns local data files into tokenized training and evaluation examples."""

    kind: ClassVar[str] = "data_format"
    Options: ClassVar[type] = DataOptions
    tasks: ClassVar[tuple[str, ...]] = TASKS

    def load(self, context: DataContext) -> DataSplits:
        """Read, validate and tokenize the data; raise DataError naming the file on bad input."""
        raise NotImplementedError

    def check(self, base_dir: Path, config_path: str = "data") -> None:
        """Cheap checks without a tokenizer (used by ``qlora validate``): the file exists, etc."""


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


KINDS: dict[str, type[Plugin]] = {
    "quantizer": Quantizer,
    "adapter": Adapter,
    "optimizer": Optimizer,
    "exporter": Exporter,
    "data_format": DataFormat,
    "model_source": ModelSource,
}
