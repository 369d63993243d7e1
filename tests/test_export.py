"""Exporters (adapter, merged, merged_4bit), their fidelity check and manifest, the 4-bit checkpoint
formats, and the safety rules every export follows.

Most tests build a "trained" context without training: the base loaded through a quantizer, LoRA
attached through the adapter plugin and its B matrices set to seeded random values, so that the
adapter changes the model noticeably. Loading a real finished run is covered by test_export_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from conftest import new_registry

from qlora_plugins import AdapterContext, ExportContext, Exporter, hookimpl
from qlora_plugins.core.checkpoint_format import check_safetensors
from qlora_plugins.core.exporting import effective_tolerance, run_exports
from qlora_plugins.core.modeling import auto_class, load_tokenizer
from qlora_plugins.errors import ConfigError, ExportError, ModelError
from qlora_plugins.exporting import (
    ExportOptions,
    check_name,
    file_sha256,
    load_model_checkpoint,
    merged_model,
    model_logits,
    probe_batch,
    safe_path,
    save_model_checkpoint,
)
from qlora_plugins.quantized import BlockwiseQuantizer

#: The tiny models are random: their next-token distributions are nearly flat, so re-quantization
#: flips many near-ties; real (trained) models agree far more (see docs/exporters.md).
LOOSE = {"min_top1": 0.0}
PROBE = [{"input_ids": list(range(5, 5 + n)), "labels": 0} for n in (20, 13, 31)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: torch's thread pool only adds overhead (and on a busy 2-core machine,
    spinning threads make each small op ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_context(
    model_dir: Path,
    registry,
    quantizer: str = "nf4",
    task: str = "causal_lm",
    quantizer_options: dict | None = None,
    lora: dict | None = None,
    scale: float = 0.05,
    config: dict | None = None,
) -> ExportContext:
    """A quantized base + LoRA whose B matrices are random (seeded): a stand-in for a trained model."""
    from qlora_plugins.core.config import parse_config
    from qlora_plugins.core.pipeline import model_request

    cfg = parse_config({"model": {"path": str(model_dir), "task": task}, "train": {"enabled": False}})
    request = model_request(cfg, model_dir, "cpu", 2 if task == "seq_cls" else None)
    q = registry.create("quantizer", quantizer, quantizer_options or {}, "quantizer")
    adapter = registry.create("adapter", "lora", {"r": 4, "alpha": 8, "dropout": 0.0, **(lora or {})}, "adapter")
    base = q.load_model(request)
    torch.manual_seed(0)  # LoRA A's initialization
    model = adapter.attach(base, AdapterContext(task=task, quantized=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    return ExportContext(model, tokenizer, model_dir, task, q, adapter, config or {"model": {"path": str(model_dir)}}, request, PROBE)


def exact_bnb(model):
    """Turn off bitsandbytes' CPU inference path (weights repacked, matmul in bf16 on CPUs with
    avx512_bf16), so that a bitsandbytes checkpoint computes exactly like our QuantLinear."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def export(context, registry, name: str, out: Path, force: bool = False, **options):
    exporter = registry.create("exporter", name, options, f"export.{name}")
    return run_exports(context, [exporter], out.parent, registry, force, lambda m: None, outputs=[out])[name]


@pytest.fixture(scope="module")
def llama_nf4(tiny_llama_dir):
    registry = new_registry()
    return make_context(tiny_llama_dir, registry), registry


def run_isolated(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (-I: no user site, no PYTHONPATH, no cwd on sys.path) in
    which importing qlora_plugins fails, so a passing script proves the artifact needs none of it."""
    script = tmp_path / "isolated.py"
    script.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'qlora_plugins':\n"
        "            raise ImportError('qlora_plugins is blocked in this check')\n"
        "sys.meta_path.insert(0, _Block())\n" + code,
        encoding="utf-8",
    )
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)


def save_logits(context, path: Path) -> None:
    from safetensors.torch import save_file

    batch, _ = probe_batch(context)
    save_file(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": model_logits(context.model, batch)},
        str(path),
    )


CHECK = """
from safetensors.torch import load_file
import torch, transformers
probe = load_file({probe!r})
model = getattr(transformers, {auto!r}).from_pretrained({path!r}){extra}
with torch.no_grad():
    logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
keep = probe["attention_mask"].bool()
print("MAXDIFF", float((logits[keep] - probe["logits"][keep]).abs().max()))
print("BLOCKED", "qlora_plugins" not in sys.modules)
"""


def maxdiff(result: subprocess.CompletedProcess) -> float:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("MAXDIFF", "BLOCKED")))
    assert lines["BLOCKED"] == "True"
    return float(lines["MAXDIFF"])


@pytest.fixture(scope="module")
def llama_exports(llama_nf4, tmp_path_factory):
    """merged (fp32) and merged_4bit (nf4, correction rank 4) of the nf4 context, plus the probe
    batch and the trained model's logits saved for isolated interpreters."""
    context, registry = llama_nf4
    root = tmp_path_factory.mktemp("exports")
    merged = export(context, registry, "merged", root / "merged")
    m4 = export(context, registry, "merged_4bit", root / "m4", correction_rank=4, tolerance=LOOSE)
    save_logits(context, root / "probe.safetensors")
    return root, merged, m4


# --- merged --------------------------------------------------------------------------------


def test_merged_fp32_is_the_trained_model(llama_exports):
    root, info, _ = llama_exports
    out = root / "merged"
    fid = info["fidelity"]
    assert fid["status"] == "passed" and fid["kl"] < 1e-8 and fid["top1"] == 1.0 and fid["max_abs_diff"] < 1e-3
    assert fid["probe"] == {"source": "held-out examples", "sequences": 3}
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    # a plain checkpoint: no peft or quantized names left
    keys = check_safetensors(out / "model.safetensors")
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "absmax" in k or "qweight" in k]


def test_merged_4bit_nf4_is_a_bitsandbytes_checkpoint(llama_exports):
    root, _, info = llama_exports
    out = root / "m4"
    assert info["format"] == "bitsandbytes" and info["quantizer"] == "nf4"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    assert (out / "correction" / "adapter_config.json").is_file()
    # the error with and without the correction is reported, and the correction lowers it
    req = info["requantization"]
    assert req["layers"] == 28 and req["with_correction"]["weight_rel_error"] < req["weight_rel_error"]
    assert info["fidelity"]["kl"] < info["fidelity_without_correction"]["kl"]
    assert info["fidelity"]["status"] == "passed"


ISOLATED_CHECK = """
from safetensors.torch import load_file
import torch, transformers, peft
probe = load_file({probe!r})
keep = probe["attention_mask"].bool()
def maxdiff(model):
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    return float((logits[keep] - probe["logits"][keep]).abs().max())
auto = transformers.AutoModelForCausalLM
print("MERGED", maxdiff(auto.from_pretrained({merged!r})))
m4 = auto.from_pretrained({m4!r})
print("M4", maxdiff(m4))
print("M4CORRECTED", maxdiff(peft.PeftModel.from_pretrained(m4, {correction!r})))
print("BLOCKED", "qlora_plugins" not in sys.modules)
"""


@pytest.mark.slow
def test_exports_load_without_the_project(llama_exports, tmp_path):
    """Plain transformers loads the merged model; transformers + bitsandbytes the 4-bit one and
    peft its correction; qlora_plugins cannot even be imported in that interpreter."""
    root, merged, m4 = llama_exports
    code = ISOLATED_CHECK.format(
        probe=str(root / "probe.safetensors"), merged=str(root / "merged"), m4=str(root / "m4"), correction=str(root / "m4" / "correction")
    )
    result = run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(
        line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0] in ("MERGED", "M4", "M4CORRECTED", "BLOCKED")
    )
    assert lines["BLOCKED"] == "True"
    assert float(lines["MERGED"]) < 1e-3
    # the same figures as the fidelity check measured in this process
    assert float(lines["M4"]) == pytest.approx(m4["fidelity_without_correction"]["max_abs_diff"], rel=1e-3, abs=1e-5)
    assert float(lines["M4CORRECTED"]) == pytest.approx(m4["fidelity"]["max_abs_diff"], rel=2e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_merged_half_precision(llama_nf4, tmp_path, dtype):
    context, registry = llama_nf4
    out = tmp_path / dtype
    info = export(context, registry, "merged", out, dtype=dtype, tolerance={"min_top1": 0.8})  # near-ties of a random model
    assert info["dtype"] == dtype and json.loads((out / "config.json").read_text())["dtype"] == dtype
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{dtype}"}
    fid = info["fidelity"]
    assert fid["status"] == "passed" and 0 < fid["kl"] < 1e-3 and fid["top1"] > 0.8
    assert fid["tolerance"] == {**effective_tolerance(registry.create("exporter", "merged", {"dtype": dtype})), "min_top1": 0.8}


def test_merged_leaves_the_trained_model_alone(llama_nf4):
    context, _ = llama_nf4
    before = {k: v.clone() for k, v in context.model.state_dict().items()}
    merged = merged_model(context.model, context.adapter, torch.float32, context.base_model_path)
    after = context.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in n for n, _ in merged.named_modules())
    batch, _ = probe_batch(context)
    assert torch.allclose(model_logits(merged, batch), model_logits(context.model, batch), atol=1e-4)


@pytest.mark.slow
def test_merged_gpt2_conv1d_and_bert_classifier(tiny_gpt2_dir, tiny_bert_dir, tmp_path):
    registry = new_registry()
    gpt2 = make_context(tiny_gpt2_dir, registry, "fp4", lora={"target_modules": ["c_attn", "c_fc"]})
    info = export(gpt2, registry, "merged", tmp_path / "gpt2")
    assert info["fidelity"]["kl"] < 1e-8
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["model_type"] == "gpt2"

    bert = make_context(tiny_bert_dir, registry, "int4_sym", task="seq_cls")
    info = export(bert, registry, "merged", tmp_path / "bert")
    assert info["fidelity"]["status"] == "passed" and info["fidelity"]["max_abs_diff"] < 1e-4
    loaded = auto_class("seq_cls").from_pretrained(str(tmp_path / "bert"))
    batch, _ = probe_batch(bert)
    assert torch.allclose(model_logits(loaded, batch), model_logits(bert.model, batch), atol=1e-4)


# --- merged_4bit ---------------------------------------------------------------------------


def test_merged_4bit_is_the_peft_merge_of_the_quantized_model(llama_nf4, llama_exports):
    """Our merge gives the same codes as peft's merge (QuantLoraLinear.merge: dequantize, add, requantize)."""
    import copy

    context, registry = llama_nf4
    root, _, _ = llama_exports
    loaded = exact_bnb(load_model_checkpoint(root / "m4", registry=registry, with_correction=False))
    peft_merged = copy.deepcopy(context.model).merge_and_unload()
    batch, _ = probe_batch(context)
    assert torch.allclose(model_logits(loaded, batch), model_logits(peft_merged, batch), atol=1e-4)


class ThirdPartySym(BlockwiseQuantizer):
    """A third-party format in the test: int8 codes in [-7, 7], scale absmax/7 per block."""

    name = "sym7_test"

    def encode_blocks(self, weight, blocksize):
        x = weight.float()
        blocks = torch.cat([x, x.new_zeros(-x.numel() % blocksize)]).view(-1, blocksize)
        scale = blocks.abs().amax(dim=1) / 7
        q = torch.round(blocks / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).clamp(-7, 7)
        return {"q": q.to(torch.int8).view(-1), "absmax": scale}

    def decode_blocks(self, state, numel, blocksize, dtype):
        q = state["q"].view(-1, blocksize).float()
        return (q * state["absmax"][:, None]).view(-1)[:numel].to(dtype)


class ThirdPartyPlugin:
    @staticmethod
    @hookimpl
    def register_quantizers(register):
        register(ThirdPartySym)


@pytest.mark.parametrize("quantizer,options", [("int4_asym", {"blocksize": 128}), ("sym7_test", {"double_quant": False})])
@pytest.mark.slow
def test_merged_4bit_own_format_round_trips_through_the_registry(tiny_llama_dir, tmp_path, quantizer, options):
    registry = new_registry(plugins=[ThirdPartyPlugin()])
    context = make_context(tiny_llama_dir, registry, quantizer, quantizer_options=options)
    out = tmp_path / "m4"
    info = export(context, registry, "merged_4bit", out, correction_rank=8, tolerance=LOOSE)
    assert info["format"] == "qlora_plugins"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qlora_plugins" and qc["quantizer"] == quantizer and qc["format_version"] == 1
    assert all(qc["options"][k] == v for k, v in options.items()) and len(qc["modules"]) == 28
    assert info["fidelity"]["status"] == "passed"
    assert info["requantization"]["with_correction"]["weight_rel_error"] < info["requantization"]["weight_rel_error"]
    # loading it back (by the quantizer's name) reproduces the checked figures exactly
    loaded = load_model_checkpoint(out, registry=registry)
    from qlora_plugins.quant_linear import QuantLinear

    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 28 and {m.quantizer.name for m in layers} == {quantizer}
    batch, _ = probe_batch(context)
    again = model_logits(loaded, batch)
    keep = batch["attention_mask"].bool()
    reference = model_logits(context.model, batch)
    assert float((again[keep] - reference[keep]).abs().max()) == pytest.approx(info["fidelity"]["max_abs_diff"], rel=1e-5, abs=1e-6)
    if quantizer == "sym7_test":  # without the plugin the checkpoint names what is missing
        with pytest.raises(Exception, match="sym7_test"):
            load_model_checkpoint(out, registry=new_registry())


@pytest.mark.slow
def test_merged_4bit_with_the_bitsandbytes_backend(tiny_llama_dir, tmp_path):
    registry = new_registry()
    context = make_context(tiny_llama_dir, registry, "nf4", quantizer_options={"backend": "bitsandbytes"})
    out = tmp_path / "m4"
    info = export(context, registry, "merged_4bit", out, tolerance=LOOSE)
    assert info["format"] == "bitsandbytes" and info["fidelity"]["status"] == "passed"


def test_merged_4bit_refuses_an_unquantized_run(tiny_llama_dir, tmp_path):
    registry = new_registry()
    context = make_context(tiny_llama_dir, registry, "none")
    with pytest.raises(ExportError, match="needs a blockwise 4-bit quantizer"):
        export(context, registry, "merged_4bit", tmp_path / "m4")
    assert not (tmp_path / "m4").exists() and list(tmp_path.iterdir()) == []


def test_save_checkpoint_round_trip_without_adapter(tiny_gpt2_dir, tmp_path):
    """A quantized GPT-2 (Conv1D projections) in both formats, loaded back bit-exactly."""
    registry = new_registry()
    ids = torch.arange(3, 40).view(1, -1)
    for name, fmt in (("nf4", "bitsandbytes"), ("int4_asym", "qlora_plugins")):
        q = registry.create("quantizer", name, {})
        m = auto_class("causal_lm").from_pretrained(str(tiny_gpt2_dir)).eval()
        q.quantize_model(m, [])
        out = tmp_path / name
        out.mkdir()
        assert save_model_checkpoint(m, out, q)["checkpoint_format"] == fmt
        loaded = exact_bnb(load_model_checkpoint(out, registry=registry))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, m(ids).logits)


# --- adapter -------------------------------------------------------------------------------


def test_adapter_export_reloads_exactly(llama_nf4, tmp_path):
    context, registry = llama_nf4
    info = export(context, registry, "adapter", tmp_path / "adapter")
    assert info["fidelity"]["status"] == "passed" and info["fidelity"]["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_adapter_fidelity_reuses_the_base_in_memory(tiny_llama_dir, tmp_path):
    """The adapter check swaps the saved adapter into the trained model (no second base load),
    computes with the saved weights, and leaves the trained model exactly as it was."""
    registry = new_registry()
    context = make_context(tiny_llama_dir, registry, lora={"dropout": 0.1})
    model = context.model
    loads = []
    original_load = context.quantizer.load_model
    context.quantizer.load_model = lambda request: loads.append(request) or original_load(request)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    info = export(context, registry, "adapter", tmp_path / "adapter")
    assert info["fidelity"]["status"] == "passed" and info["fidelity"]["max_abs_diff"] == 0.0
    assert loads == []  # the base was not loaded again
    after = dict(model.named_parameters())
    assert set(after) == set(before) and model.active_adapter == "default" and not model.training
    for name, (value, grad) in before.items():
        assert torch.equal(after[name], value) and after[name].requires_grad == grad

    # the swapped-in model computes with the *saved* weights: perturb the trained ones first
    batch, _ = probe_batch(context)
    expected = model_logits(model, batch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    with context.adapter.swap_in(model, tmp_path / "adapter") as swapped:
        assert torch.equal(model_logits(swapped, batch), expected)
    assert not torch.equal(model_logits(model, batch), expected)
    assert list(model.peft_config) == ["default"]


@pytest.mark.slow
def test_adapter_fidelity_with_trained_biases_loads_a_fresh_base(tiny_llama_dir, tmp_path):
    """bias != none writes into base weights shared by every adapter: the check reloads the base."""
    registry = new_registry()
    context = make_context(tiny_llama_dir, registry, quantizer="none", lora={"bias": "all"})
    loads = []
    original_load = context.quantizer.load_model
    context.quantizer.load_model = lambda request: loads.append(request) or original_load(request)
    info = export(context, registry, "adapter", tmp_path / "adapter")
    assert info["fidelity"]["status"] == "passed" and info["fidelity"]["max_abs_diff"] == 0.0
    assert len(loads) == 1
    with pytest.raises(NotImplementedError):
        with context.adapter.swap_in(context.model, tmp_path / "adapter"):
            pass


# --- manifest ------------------------------------------------------------------------------


def test_manifest(llama_nf4, tmp_path):
    context, registry = llama_nf4
    out = tmp_path / "merged"
    info = export(context, registry, "merged", out, dtype="bfloat16", tolerance={"max_kl": 0.5, "min_top1": 0.5})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["manifest_version"] == 1
    assert manifest["exporter"]["name"] == "merged" and manifest["exporter"]["distribution"] == "qlora-plugins"
    assert manifest["exporter"]["options"]["dtype"] == "bfloat16"
    assert manifest["plugins"]["quantizer"]["name"] == "nf4" and manifest["plugins"]["adapter"]["name"] == "lora"
    assert manifest["plugins"]["quantizer"]["version"] and manifest["versions"]["torch"] == torch.__version__
    base = manifest["base_model"]
    assert base["path"] == str(context.base_model_path) and base["model_type"] == "llama"
    assert base["config_sha256"] == file_sha256(context.base_model_path / "config.json")
    assert manifest["config"] == context.config
    files = {f["path"]: f for f in manifest["files"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk
    for rel, entry in files.items():
        assert entry["size"] == (out / rel).stat().st_size and entry["sha256"] == file_sha256(out / rel)
    fid = manifest["fidelity"]
    assert fid == info["fidelity"] and fid["tolerance"] == {"max_kl": 0.5, "min_top1": 0.5}
    assert {"max_abs_diff", "mean_abs_diff", "kl", "kl_max", "top1", "positions"} <= set(fid)


# --- tolerance -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tolerance_exceeded_fails_and_leaves_the_earlier_export_untouched(llama_nf4, tmp_path):
    context, registry = llama_nf4
    out = tmp_path / "m4"
    export(context, registry, "merged_4bit", out, tolerance=LOOSE)
    before = {p.name: file_sha256(p) for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"failed its fidelity check \(kl \S+ > max_kl 0[;)].*nothing was written"):
        export(context, registry, "merged_4bit", out, force=True, tolerance={"max_kl": 0.0})
    assert {p.name: file_sha256(p) for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m4"]  # no temporary directory left behind
    with pytest.raises(ExportError, match=r"top1 .* < min_top1 1"):
        export(context, registry, "merged_4bit", tmp_path / "other", tolerance={"min_top1": 1.0, "max_kl": 1e9})
    assert not (tmp_path / "other").exists()


def test_tolerance_options(registry):
    merged = registry.create("exporter", "merged", {"tolerance": {"max_kl": 0.1, "max_abs_diff": 1e9}})
    assert effective_tolerance(merged) == {"max_kl": 0.1, "min_top1": 0.99, "max_abs_diff": 1e9}
    with pytest.raises(ConfigError, match=r"export.tolerance.min_top1: must be in \[0.0, 1.0\]"):
        registry.create("exporter", "merged", {"tolerance": {"min_top1": 2}}, "export")
    with pytest.raises(ConfigError, match="export.tolerance.max_kll: unknown key .*did you mean 'max_kl'"):
        registry.create("exporter", "merged", {"tolerance": {"max_kll": 1}}, "export")


def test_verify_off_is_recorded(llama_nf4, tmp_path):
    context, registry = llama_nf4
    info = export(context, registry, "merged", tmp_path / "m", verify=False)
    assert info["fidelity"]["status"] == "skipped"


def test_probe_text_option(llama_nf4, tmp_path):
    context, registry = llama_nf4
    info = export(context, registry, "merged", tmp_path / "m", probe_text="Hello there, general Kenobi.")
    assert info["fidelity"]["probe"] == {"source": "probe_text", "sequences": 1}
    assert info["fidelity"]["positions"] == len(context.tokenizer("Hello there, general Kenobi.")["input_ids"])


# --- safety --------------------------------------------------------------------------------


@attrs.define
class WriterOptions(ExportOptions):
    write: str = "weights.safetensors"
    link: bool = False


class WriterExporter(Exporter):
    """Test exporter: writes one file (name from its options), optionally a link."""

    name = "writer_test"
    Options = WriterOptions

    def export(self, context, output_dir):
        target = safe_path(output_dir, self.options.write)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
        if self.options.link:
            (output_dir / "link").symlink_to("/etc/passwd")
        return {}


class WriterPlugin:
    @staticmethod
    @hookimpl
    def register_exporters(register):
        register(WriterExporter)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"write": "model.bin"}, "only safetensors"),
        ({"write": "sub/state.pt"}, "only safetensors"),
        ({"write": "../escape.safetensors"}, "outside"),
        ({"write": "/tmp/abs.safetensors"}, "outside"),
        ({"write": "manifest.json"}, "reserved"),
        ({"link": True}, "link"),
    ],
)
def test_unsafe_artifacts_are_refused(llama_nf4, tmp_path, options, message):
    context, _ = llama_nf4
    registry = new_registry(plugins=[WriterPlugin()])
    out = tmp_path / "exports"
    exporter = registry.create("exporter", "writer_test", options)
    with pytest.raises(ExportError, match=message):
        run_exports(context, [exporter], out, registry, False, lambda m: None)
    assert not (out / "writer_test").exists() and not list(out.glob(".*"))
    assert not (tmp_path / "escape.safetensors").exists()


def test_not_reloadable_is_recorded_as_not_measured(llama_nf4, tmp_path):
    context, _ = llama_nf4
    registry = new_registry(plugins=[WriterPlugin()])
    exporter = registry.create("exporter", "writer_test", {"write": "notes.txt"})
    info = run_exports(context, [exporter], tmp_path, registry, False, lambda m: None)["writer_test"]
    assert info["fidelity"]["status"] == "not_measured" and (tmp_path / "writer_test" / "manifest.json").is_file()


def test_directory_option_and_names(llama_nf4, registry, tmp_path):
    for bad in ("../up", "a/b", ".hidden", "..", ""):
        with pytest.raises(ExportError):
            check_name(bad)
    with pytest.raises(ConfigError, match="export.directory"):
        registry.create("exporter", "merged", {"directory": "../outside"}, "export")
    context, _ = llama_nf4
    exporters = [registry.create("exporter", "merged", {"verify": False}), registry.create("exporter", "merged", {"verify": False})]
    with pytest.raises(ExportError, match="would both write"):
        run_exports(context, exporters, tmp_path, registry, False, lambda m: None)
    exporters[1] = registry.create("exporter", "merged", {"verify": False, "directory": "merged-bf16", "dtype": "bfloat16"})
    results = run_exports(context, exporters, tmp_path, registry, False, lambda m: None)
    assert set(results) == {"merged", "merged-bf16"} and results["merged-bf16"]["dtype"] == "bfloat16"


def test_corrupt_and_truncated_safetensors_are_named(llama_nf4, tmp_path):
    context, registry = llama_nf4
    out = tmp_path / "m"
    export(context, registry, "merged", out, verify=False)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated .*truncated"):
        check_safetensors(weights)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_model_checkpoint(out)
    weights.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelError, match="header length"):
        check_safetensors(weights)
