"""Exporting, split by job: where exports go and what they may hold (:mod:`.paths`), the options
and tolerance every verified exporter takes (:mod:`.tolerance`), fidelity against the trained model
(:mod:`.fidelity`), merging an adapter into plain weights (:mod:`.merging`), the manifest
(:mod:`.manifest`), the runner (:mod:`.runner`) and ``qlora export`` of a finished run
(:mod:`.finished_run`). Plugin authors import the public names from :mod:`qlora_plugins.exporting`.
"""

from qlora_plugins.core.exporting.fidelity import (
    PROBE_MAX_EXAMPLES,
    PROBE_MAX_TOKENS,
    compare_logits,
    load_adapter_onto_base,
    measure_fidelity,
    model_logits,
    probe_batch,
    reloaded_artifact,
)
from qlora_plugins.core.exporting.finished_run import export_run, load_run
from qlora_plugins.core.exporting.manifest import MANIFEST_VERSION, base_model_identity, build_manifest
from qlora_plugins.core.exporting.merging import (
    dequantized_weight,
    finish_plain_model,
    is_quantized_layer,
    merged_model,
    original_layer_types,
    plain_layer,
)
from qlora_plugins.core.exporting.paths import (
    FORBIDDEN_SUFFIXES,
    check_artifact,
    check_export_target,
    check_name,
    export_directory,
    remove_own_temporaries,
    safe_path,
)
from qlora_plugins.core.exporting.runner import RESERVED_RESULT_KEYS, current_registry, run_exports
from qlora_plugins.core.exporting.tolerance import GENERIC_TOLERANCE, ExportOptions, Tolerance, effective_tolerance, violations
from qlora_plugins.core.safety import MANIFEST

__all__ = [
    "FORBIDDEN_SUFFIXES",
    "GENERIC_TOLERANCE",
    "MANIFEST",
    "MANIFEST_VERSION",
    "PROBE_MAX_EXAMPLES",
    "PROBE_MAX_TOKENS",
    "RESERVED_RESULT_KEYS",
    "ExportOptions",
    "Tolerance",
    "base_model_identity",
    "build_manifest",
    "check_artifact",
    "check_export_target",
    "check_name",
    "compare_logits",
    "current_registry",
    "dequantized_weight",
    "effective_tolerance",
    "export_directory",
    "export_run",
    "finish_plain_model",
    "is_quantized_layer",
    "load_adapter_onto_base",
    "load_run",
    "measure_fidelity",
    "merged_model",
    "model_logits",
    "original_layer_types",
    "plain_layer",
    "probe_batch",
    "reloaded_artifact",
    "remove_own_temporaries",
    "run_exports",
    "safe_path",
    "violations",
]
