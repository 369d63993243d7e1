"""A third-party exporter for qlora-plugins: ``gguf``, a merged Llama-family or GPT-2-family model
as one GGUF file for llama.cpp, in F16 or Q8_0, written and read back with the ``gguf`` package.

llama.cpp needs ``tokenizer.ggml.merges`` for every byte-level BPE vocabulary, even one without
merges (the tiny models' byte tokenizer): the gguf package drops an empty array, so the exporter
writes an empty string array itself (:class:`_Writer`), which tokenizes exactly as the original
tokenizer does (one token a byte).

Written against the public contract only: an :class:`~qlora_plugins.Exporter` subclass whose
options extend :class:`~qlora_plugins.exporting.ExportOptions`, registered through the
``register_exporters`` hook of an entry point in the ``qlora_plugins`` group. The host runs
:meth:`GGUFExporter.export` into a temporary directory, then :meth:`GGUFExporter.reload` (logit
fidelity against the trained model) and :meth:`GGUFExporter.verify` (tensor-level fidelity), checks
the tolerance and writes the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import attrs

from qlora_plugins import ExportContext, Exporter, hookimpl
from qlora_plugins.errors import ExportError
from qlora_plugins.exporting import ExportOptions, Tolerance, check_name, merged_model, safe_path
from qlora_plugins.options import in_range

#: transformers model_type -> gguf architecture (llama and mistral use llama.cpp's llama graph).
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "gpt2": "GPT2"}
#: GPT-2's Conv1D weights are stored [in, out]; GGUF wants [out, in] like a Linear.
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
TOLERANCES = {
    "f16": {"max_kl": 1e-4, "min_top1": 0.99, "max_tensor_rel_error": 1e-3},
    "q8_0": {"max_kl": 2e-3, "min_top1": 0.95, "max_tensor_rel_error": 1e-2},
}


@attrs.define
class GGUFTolerance(Tolerance):
    """The logit bounds plus one on the tensors read back from the file."""

    max_tensor_rel_error: Optional[float] = attrs.field(
        default=None, validator=in_range(0.0, None), metadata={"figure": "tensor_rel_error", "bound": "max"}
    )


def _gguf_filename(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    try:
        check_name(value)
    except ExportError as exc:
        raise ValueError(str(exc), attribute) from None
    if not value.endswith(".gguf"):
        raise ValueError(f"must end in .gguf, got {value!r}", attribute)


@attrs.define
class GGUFOptions(ExportOptions):
    """``outtype`` of the 2-D weights (1-D tensors stay F32) and the file name."""

    outtype: Literal["f16", "q8_0"] = "f16"
    filename: str = attrs.field(default="model.gguf", validator=_gguf_filename)
    tolerance: GGUFTolerance = attrs.field(factory=GGUFTolerance)


def permute_rotary(weight: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's row permutation of Q/K weights (HF's rotate-half layout -> interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """Inverse of :func:`permute_rotary`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _writer_class(gguf: Any) -> Any:
    """``gguf.GGUFWriter`` that writes an empty array whose element type is given (the gguf
    package refuses to pack one, and llama.cpp refuses a BPE vocabulary without the merges key)."""

    class _Writer(gguf.GGUFWriter):
        def add_empty_array(self, key: str, sub_type: Any) -> None:
            self.add_key_value(key, [], gguf.GGUFValueType.ARRAY, sub_type=sub_type)

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return _Writer


class GGUFExporter(Exporter):
    """Merged model as a GGUF file for llama.cpp (F16 or Q8_0), verified by reading it back."""

    name = "gguf"
    Options = GGUFOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._expected: dict = {}

    def default_tolerance(self) -> dict:
        return dict(TOLERANCES[self.options.outtype])

    # --- writing ----------------------------------------------------------------------------

    def export(self, context: ExportContext, output_dir: Path) -> dict:
        import gguf
        import numpy as np
        import torch

        config = _config(context)
        if context.task != "causal_lm" or config.model_type not in ARCHITECTURES:
            raise ExportError(
                f"exporter 'gguf' writes Llama- and GPT-2-family causal LMs ({', '.join(ARCHITECTURES)}), "
                f"not a {config.model_type} {context.task} model"
            )
        gpt2 = config.model_type == "gpt2"
        if not gpt2:
            rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
            if rope.get("rope_type", "default") != "default":
                raise ExportError(f"exporter 'gguf' supports plain RoPE only, not rope_type {rope['rope_type']!r}")
        model = merged_model(context.model, context.adapter, torch.float32, context.base_model_path)
        arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
        path = safe_path(output_dir, self.options.filename)
        writer = _writer_class(gguf)(str(path), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(f"{Path(context.base_model_path).name}-qlora")
        if gpt2:
            n_head = n_kv = config.n_head
            writer.add_context_length(config.n_positions)
            writer.add_embedding_length(config.n_embd)
            writer.add_block_count(config.n_layer)
            writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
            writer.add_head_count(n_head)
            writer.add_layer_norm_eps(config.layer_norm_epsilon)
            n_layers = config.n_layer
        else:
            n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
            writer.add_context_length(config.max_position_embeddings)
            writer.add_embedding_length(config.hidden_size)
            writer.add_block_count(config.num_hidden_layers)
            writer.add_feed_forward_length(config.intermediate_size)
            writer.add_head_count(n_head)
            writer.add_head_count_kv(n_kv)
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
            writer.add_layer_norm_rms_eps(config.rms_norm_eps)
            n_layers = config.num_hidden_layers
        writer.add_vocab_size(config.vocab_size)
        q8 = self.options.outtype == "q8_0"
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.MOSTLY_F16)
        if q8:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer_model = self._add_tokenizer(writer, context.tokenizer, gguf)

        names = gguf.get_tensor_name_map(arch, n_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        types: dict[str, int] = {}
        self._expected = {}
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue
            new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ExportError(f"exporter 'gguf': no llama.cpp name for tensor {hf_name}")
            data = tensor.detach().float().cpu().numpy()
            if gpt2 and hf_name.endswith(GPT2_CONV1D):
                data = np.ascontiguousarray(data.T)
            self._expected[new_name] = data
            if hf_name.endswith("q_proj.weight"):
                data = permute_rotary(data, n_head, n_head)
            elif hf_name.endswith("k_proj.weight"):
                data = permute_rotary(data, n_head, n_kv)
            if data.ndim == 1:
                writer.add_tensor(new_name, data.astype(np.float32))
                types[new_name] = "F32"
            elif q8 and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                writer.add_tensor(
                    new_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
                )
                types[new_name] = "Q8_0"
            else:
                writer.add_tensor(new_name, data.astype(np.float16))
                types[new_name] = "F16"
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        del model
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        import importlib.metadata as md

        return {
            "format": "gguf",
            "file": self.options.filename,
            "outtype": self.options.outtype,
            "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "tensors": len(types),
            "tensor_types": counts,
            "tokenizer": tokenizer_model,
            "gguf_version": md.version("gguf"),
        }

    @staticmethod
    def _add_tokenizer(writer: Any, tokenizer: Any, gguf: Any) -> str:
        """Vocabulary, merges (byte-level BPE) and special token ids."""
        import json

        vocab = tokenizer.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = set(tokenizer.all_special_tokens)
        merges: list[str] = []
        kind = "llama"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            if spec.get("model", {}).get("type") == "BPE" and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
                kind = "gpt2"
                merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        writer.add_tokenizer_model(kind)
        if kind == "gpt2":
            writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        if kind == "gpt2" and merges:
            writer.add_token_merges(merges)
        elif kind == "gpt2":  # a byte vocabulary without merges: llama.cpp still needs the key
            writer.add_empty_array(gguf.Keys.Tokenizer.MERGES, gguf.GGUFValueType.STRING)
        else:
            writer.add_token_scores([0.0] * len(tokens))
        for attr, add in (
            ("bos_token_id", writer.add_bos_token_id),
            ("eos_token_id", writer.add_eos_token_id),
            ("pad_token_id", writer.add_pad_token_id),
            ("unk_token_id", writer.add_unk_token_id),
        ):
            value = getattr(tokenizer, attr, None)
            if value is not None:
                add(int(value))
        return kind

    # --- checking ---------------------------------------------------------------------------

    def reload(self, directory: Path, context: ExportContext) -> Any:
        """The model loaded back by transformers' GGUF loader (dequantized to fp32). For GPT-2 the
        trained model's config is passed along: transformers maps ``gpt2.context_length`` to
        ``n_ctx``, which GPT2Config ignores, and so expects 1024 position embeddings."""
        from transformers import AutoModelForCausalLM

        kwargs = {}
        config = _config(context)
        if config.model_type == "gpt2":  # transformers reads gpt2.context_length into n_ctx, not n_positions
            kwargs["config"] = type(config).from_dict(config.to_dict())
        return AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=self.options.filename, **kwargs).eval()

    def verify(self, directory: Path, context: ExportContext) -> dict:
        """Read the file back with ``gguf.GGUFReader``, dequantize and un-permute every tensor and
        compare it with the merged weights: the largest relative (Frobenius) error over tensors
        and the largest absolute element error."""
        import gguf
        import numpy as np

        config = _config(context)
        n_head = getattr(config, "num_attention_heads", None) or config.n_head
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        reader = gguf.GGUFReader(str(safe_path(directory, self.options.filename)))
        found = {t.name: t for t in reader.tensors}
        missing = sorted(set(self._expected) - set(found))
        if missing:
            raise ExportError(f"exporter 'gguf': {len(missing)} tensor(s) missing from the file (e.g. {missing[0]})")
        worst_rel, worst_abs, worst = 0.0, 0.0, ""
        for name, expected in self._expected.items():
            tensor = found[name]
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(expected.shape)
            if ".attn_q." in name:
                data = unpermute_rotary(data, n_head, n_head)
            elif ".attn_k." in name:
                data = unpermute_rotary(data, n_head, n_kv)
            norm = float(np.linalg.norm(expected))
            rel = float(np.linalg.norm(data - expected)) / norm if norm else float(np.abs(data).max(initial=0.0))
            if rel > worst_rel:
                worst_rel, worst = rel, name
            worst_abs = max(worst_abs, float(np.abs(data - expected).max(initial=0.0)))
        self._expected = {}
        return {"tensor_rel_error": worst_rel, "tensor_max_abs_error": worst_abs, "tensor_worst": worst, "tensors_checked": len(found)}


def _config(context: ExportContext) -> Any:
    """The transformers config of the trained model (under the adapter's wrapper, if any)."""
    model = context.model
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


@hookimpl
def register_exporters(register):
    register(GGUFExporter)
