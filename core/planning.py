"""What the memory planner and the plugins it asks share: the shapes of a model's linear layers,
the architecture, and the small results that plugins' ``planned_*`` methods return.

The planner (:mod:`qlora_plugins.core.planner`) knows no plugin by name: it asks the quantizer how
it stores a weight (:meth:`~qlora_plugins.core.interfaces.Quantizer.planned_bytes`), the adapter how
many parameters it trains and what it stores for backward
(:meth:`~qlora_plugins.core.interfaces.Adapter.planned_trainable`,
:meth:`~qlora_plugins.core.interfaces.Adapter.planned_activations`), and the optimizer where its
states live (:meth:`~qlora_plugins.core.interfaces.Optimizer.planned_state_bytes`). Plugin authors
import these types from :mod:`qlora_plugins.planning`.
"""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.define(frozen=True)
class LinearShape:
    """A group of ``count`` identical linear layers (e.g. every layer's ``q_proj``)."""

    name: str
    in_features: int
    out_features: int
    count: int = 1

    @property
    def numel(self) -> int:
        """Weights of one layer of the group."""
        return self.in_features * self.out_features


@attrs.define
class Architecture:
    """What the planner needs to know about a model."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: list[LinearShape]
    other_params: int
    checkpoint_dtype: Optional[str] = None
    checkpoint_bytes: Optional[int] = None
    largest_tensor: int = 0
    source: str = "preset"

    @property
    def linear_params(self) -> int:
        """Weights of every linear layer (what a quantizer quantizes)."""
        return sum(l.numel * l.count for l in self.linears)

    @property
    def total_params(self) -> int:
        """Every parameter of the model."""
        return self.linear_params + self.other_params


@attrs.define(frozen=True)
class ActivationCoefficients:
    """Bytes an adapter's training saves for backward per token and per decoder layer:
    ``h * hidden + i * intermediate + kv * (kv_heads * head_dim) + c``
    (see docs/memory.md for how the builtins' values were measured)."""

    h: float
    i: float
    kv: float
    c: float


@attrs.define(frozen=True)
class StateBytes:
    """Where an optimizer keeps its states for a number of trainable parameters.

    :param device_bytes: bytes on the training device.
    :param host_bytes: bytes in host memory (states, and any host copies of gradients or weights).
    :param pageable: the device bytes may move to the host under pressure (CUDA unified memory);
        the planner lets them spill when a device budget is short.
    :param note: a few words for the plan's optimizer row (e.g. ``on the host; steps there``).
    """

    device_bytes: float = 0.0
    host_bytes: float = 0.0
    pageable: bool = False
    note: str = ""
