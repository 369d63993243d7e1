"""What exporter authors need: the options and tolerance every verified exporter takes, path and
name checks, the fidelity helpers, merging an adapter into plain weights, and writing or reading
model checkpoints (plain or 4-bit). See docs/plugins.md ("Exporters") and docs/exporters.md.

The host reserves ``manifest.json`` (it writes it) and the keys of an export's result listed in
:data:`RESERVED_RESULT_KEYS`; facts an exporter returns under those names are ignored.
"""

from qlora_plugins.core.checkpoint_format import (
    CORRECTION_ADAPTER_FILE,
    CORRECTION_DIR,
    attach_adapter_dir,
    bnb_compatible,
    file_sha256,
    load_model_checkpoint,
    quantized_modules,
    save_model_checkpoint,
    state_from_bnb,
)
from qlora_plugins.core.exporting import (
    FORBIDDEN_SUFFIXES,
    GENERIC_TOLERANCE,
    MANIFEST,
    RESERVED_RESULT_KEYS,
    ExportOptions,
    Tolerance,
    check_name,
    compare_logits,
    current_registry,
    dequantized_weight,
    finish_plain_model,
    is_quantized_layer,
    load_adapter_onto_base,
    merged_model,
    model_logits,
    original_layer_types,
    plain_layer,
    probe_batch,
    safe_path,
)

__all__ = [
    "CORRECTION_ADAPTER_FILE",
    "CORRECTION_DIR",
    "FORBIDDEN_SUFFIXES",
    "GENERIC_TOLERANCE",
    "MANIFEST",
    "RESERVED_RESULT_KEYS",
    "ExportOptions",
    "Tolerance",
    "attach_adapter_dir",
    "bnb_compatible",
    "check_name",
    "compare_logits",
    "current_registry",
    "dequantized_weight",
    "file_sha256",
    "finish_plain_model",
    "is_quantized_layer",
    "load_adapter_onto_base",
    "load_model_checkpoint",
    "merged_model",
    "model_logits",
    "original_layer_types",
    "plain_layer",
    "probe_batch",
    "quantized_modules",
    "safe_path",
    "save_model_checkpoint",
    "state_from_bnb",
]
