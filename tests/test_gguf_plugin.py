"""The third-party exporter package examples/plugins/qlora-gguf, installed for real: listed by
`qlora plugins`, run by `qlora export` through its entry point, and its GGUF file read back with
the gguf package's reader and compared with the merged weights."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, base_config, invoke, new_registry

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from test_export_cli import make_trained_run  # noqa: E402  (the run shared with test_export_cli.py)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "examples" / "plugins" / "qlora-gguf"
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gguf_installed():
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(PACKAGE)]
    subprocess.run(pip, check=True, capture_output=True)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "qlora-gguf"], capture_output=True)
        sys.modules.pop("qlora_gguf", None)
        importlib.invalidate_caches()


@pytest.fixture
def autoload(gguf_installed, monkeypatch):
    monkeypatch.delenv("QLORA_PLUGINS_DISABLE_AUTOLOAD", raising=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir) -> Path:
    return make_trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def merged_weights(trained_run, tmp_path_factory) -> dict:
    """The run merged by the builtin `merged` exporter (fp32): what the GGUF file must hold."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("gguf-merged") / "merged"
    result = invoke("export", trained_run, "-e", "merged", "-o", out, "--option", "dtype=float32")
    assert result.exit_code == 0, (result.output, result.exception)
    return load_file(str(out / "model.safetensors"))


def test_listed_with_its_distribution(autoload):
    result = invoke("plugins", "--kind", "exporter", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)["plugins"]}
    assert rows["gguf"]["distribution"] == "qlora-gguf" and rows["gguf"]["version"] == "0.1.0"


def test_q8_0_export_through_qlora_export(autoload, trained_run, merged_weights, tmp_path):
    from qlora_gguf import unpermute_rotary

    out = tmp_path / "gguf"
    result = invoke("export", trained_run, "-e", "gguf", "-o", out, "--option", "outtype=q8_0", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)["gguf"]
    assert info["format"] == "gguf" and info["outtype"] == "q8_0" and info["tensor_types"] == {"F32": 9, "Q8_0": 30}
    fid = info["fidelity"]
    # tensor-level figures from gguf's reader, logit figures from transformers' GGUF loader
    assert fid["status"] == "passed" and fid["tensors_checked"] == 39 and fid["tensor_rel_error"] < 0.01
    assert fid["kl"] < 1e-3 and fid["probe"]["source"] == "held-out examples"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exporter"]["distribution"] == "qlora-gguf" and [f["path"] for f in manifest["files"]] == ["model.gguf"]

    reader = gguf.GGUFReader(str(out / "model.gguf"))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert int(reader.fields["llama.block_count"].parts[-1][0]) == 4
    assert int(reader.fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(4) for n in LAYER_TENSORS}
    assert set(tensors) == expected
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    def read(name):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()

    # Q/K rows are stored in llama.cpp's rotary order: un-permuted they are the merged weights
    want = merged_weights["model.layers.1.self_attn.k_proj.weight"]
    stored = read("blk.1.attn_k.weight")
    assert torch.allclose(torch.from_numpy(unpermute_rotary(stored.numpy(), 4, 2)), want, atol=2e-3)
    assert not torch.allclose(stored, want, atol=2e-3)
    assert torch.allclose(read("blk.2.ffn_down.weight"), merged_weights["model.layers.2.mlp.down_proj.weight"], atol=2e-3)
    assert torch.equal(read("output_norm.weight"), merged_weights["model.norm.weight"])


def test_f16_through_the_api(autoload, trained_run, tmp_path):
    from qlora_plugins.core.exporting import export_run
    from qlora_plugins.core.registry import create_registry

    registry = create_registry(load_entrypoints=True)
    results = export_run(trained_run, ["gguf"], registry, output=tmp_path / "f16", options=["filename=tiny.gguf"])
    fid = results["gguf"]["fidelity"]
    assert results["gguf"]["tensor_types"] == {"F32": 9, "F16": 30} and (tmp_path / "f16" / "tiny.gguf").is_file()
    assert fid["tensor_rel_error"] < 1e-3 and fid["kl"] < 1e-6 and fid["top1"] > 0.99


def test_bad_input(autoload, trained_run, tmp_path, tiny_bert_dir):
    assert_user_error(invoke("export", trained_run, "-e", "gguf", "--option", "filename=../up.gguf"), "filename")
    assert_user_error(invoke("export", trained_run, "-e", "gguf", "--option", "outtype=q4_0"), "outtype", "'f16', 'q8_0'")
    assert not (tmp_path / "up.gguf").exists()

    from test_export import make_context

    from qlora_plugins.core.exporting import run_exports
    from qlora_plugins.errors import ExportError

    registry = new_registry(load_entrypoints=True)
    context = make_context(tiny_bert_dir, registry, "nf4", task="seq_cls")
    exporter = registry.create("exporter", "gguf", {})
    with pytest.raises(ExportError, match="writes Llama- and GPT-2-family causal LMs .* not a bert seq_cls"):
        run_exports(context, [exporter], tmp_path, registry, False, lambda m: None)
    assert not (tmp_path / "gguf").exists()


# --- llama.cpp itself loads the files -----------------------------------------------------------

#: The prebuilt llama-cpp-python wheel (shared/wheels/README.md): next to the checkout, or named
#: by QLORA_LLAMA_CPP_WHEEL.
WHEELS = REPO.parent / "shared" / "wheels"
PROMPT = "The quick brown fox jumps over the lazy dog. Instruction: say hello!"


def _wheel() -> Path | None:
    named = os.environ.get("QLORA_LLAMA_CPP_WHEEL")
    if named:
        return Path(named) if Path(named).is_file() else None
    found = sorted(WHEELS.glob("llama_cpp_python-*.whl")) if WHEELS.is_dir() else []
    return found[-1] if found else None


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, installed from the prebuilt wheel when it is not installed yet."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    wheel = _wheel()
    if wheel is None:
        pytest.skip(f"llama-cpp-python is not installed and no prebuilt wheel is in {WHEELS} (or QLORA_LLAMA_CPP_WHEEL)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot install {wheel.name}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_gpt2_dir) -> Path:
    """A tiny GPT-2 run trained for two steps (tied embeddings, Conv1D weights, biases)."""
    root = tmp_path_factory.mktemp("gguf-gpt2-run")
    config = base_config(model={"source": "tiny-gpt2"}, train={"max_steps": 2, "batch_size": 4, "seed": 0})
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = invoke("run", path, "-o", root / "run", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    return root / "run"


def _merged(run: Path, out: Path) -> tuple:
    """The run's fp32 merged model (the builtin `merged` exporter) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = invoke("export", run, "-e", "merged", "-o", out, "--option", "dtype=float32")
    assert result.exit_code == 0, (result.output, result.exception)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(out))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llama_cpp_loads_and_agrees(family, llama_cpp, autoload, trained_run, gpt2_run, tmp_path, capsys):
    """llama.cpp loads the F16 and Q8_0 files (the merges key is there even for a vocabulary
    without merges), tokenizes like the run's tokenizer, and its next-token logits agree with
    the merged model's."""
    run = trained_run if family == "llama" else gpt2_run
    model, tokenizer = _merged(run, tmp_path / "merged")
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    figures = {}
    for outtype, (min_top1, max_diff) in {"f16": (0.99, 0.01), "q8_0": (0.9, 0.05)}.items():
        out = tmp_path / outtype
        result = invoke("export", run, "-e", "gguf", "-o", out, "--option", f"outtype={outtype}")
        assert result.exit_code == 0, (result.output, result.exception)
        reader = gguf.GGUFReader(str(out / "model.gguf"))
        assert "tokenizer.ggml.merges" in reader.fields
        llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), logits_all=True, verbose=False, n_ctx=256, n_threads=1)
        try:
            assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
            llm.eval(ids)
            got = torch.from_numpy(llm.scores[: len(ids)].copy()).float()
        finally:
            llm.close()
        assert got.shape == want.shape
        top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        diff = float((got - want).abs().max())
        figures[outtype] = {"top1": round(top1, 4), "max_logit_diff": round(diff, 5), "logit_range": round(float(want.abs().max()), 4)}
        assert top1 >= min_top1 and diff <= max_diff, (outtype, figures)
    with capsys.disabled():
        print(f"\nllama.cpp vs merged {family} ({len(ids)} positions): {json.dumps(figures)}")
