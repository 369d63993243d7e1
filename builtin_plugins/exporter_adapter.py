"""Builtin exporter ``adapter``: the trained adapter in its own (PEFT) format."""

from __future__ import annotations

from pathlib import Path

from qlora_plugins import ExportContext, Exporter, hookimpl


class AdapterExporter(Exporter):
    """The adapter alone (adapter_config.json + adapter_model.safetensors for LoRA)."""

    name = "adapter"
    default = True  # what a config without an export section gets

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        context.adapter.save(context.model, output_dir)
        return {"format": "peft-adapter", "adapter": context.adapter.name}


@hookimpl(trylast=True)
def register_exporters(register):
    register(AdapterExporter)
