"""Builtin exporter ``adapter``: the trained adapter in its own (PEFT) format."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from qlora_plugins import ExportContext, Exporter, hookimpl
from qlora_plugins.exporting import load_adapter_onto_base


class AdapterExporter(Exporter):
    """The adapter alone (adapter_config.json + adapter_model.safetensors for LoRA)."""

    name = "adapter"
    default = True  # what a config without an export section gets

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        context.adapter.save(context.model, output_dir)
        return {"format": "peft-adapter", "adapter": context.adapter.name}

    @contextlib.contextmanager
    def reload(self, directory: Path, context: ExportContext) -> Iterator[Any]:
        """The saved adapter swapped into the trained model's base already in memory
        (:meth:`Adapter.swap_in`), or, when the adapter cannot swap, attached to a freshly loaded
        base through the run's quantizer and adapter plugins."""
        with contextlib.ExitStack() as stack:
            try:
                swapped = stack.enter_context(context.adapter.swap_in(context.model, directory))
            except NotImplementedError:
                swapped = None
            if swapped is not None:
                yield swapped
                return
        yield load_adapter_onto_base(context, directory)


@hookimpl
def register_exporters(register):
    register(AdapterExporter)
