"""Public API for exporter authors: the options every verified exporter takes, the tolerance
class, and helpers for writing and checking an artifact (re-exported from the core).

The host's side of the exporter contract (running ``export``, the file checks, the fidelity check
through ``reload`` / ``verify`` / ``default_tolerance``, the manifest) is described in
docs/plugins.md (section "Writing an exporter") and docs/exporters.md.
"""

from qlora_plugins.core.exporting import (
    FORBIDDEN_SUFFIXES,
    GENERIC_TOLERANCE,
    MANIFEST,
    RESERVED_RESULT_KEYS,
    ExportOptions,
    Tolerance,
    check_name,
    compare_logits,
    merged_model,
    model_logits,
    safe_path,
)

__all__ = [
    "FORBIDDEN_SUFFIXES",
    "GENERIC_TOLERANCE",
    "MANIFEST",
    "RESERVED_RESULT_KEYS",
    "ExportOptions",
    "Tolerance",
    "check_name",
    "compare_logits",
    "merged_model",
    "model_logits",
    "safe_path",
]
