"""The quantizer contract: builtin formats pass the conformance kit, nf4/fp4 interchange with
bitsandbytes bit for bit, footprints give the documented bits per parameter, any architecture's
linear layers quantize (decoder, encoder, ViT), quantize-while-loading equals quantize-after-load,
and bad weights are clear errors naming the layer."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_plugins.core.options import build_options
from qlora_plugins.core.registry import create_registry
from qlora_plugins.errors import QuantizationError
from qlora_plugins.quant_linear import QuantLinear
from qlora_plugins.testing import quantizer_checks

FORMATS = ["nf4", "fp4", "int4_sym", "int4_asym"]


def make(name: str, **options):
    cls = create_registry(load_entrypoints=False).get("quantizer", name)
    return cls(build_options(cls.Options, options, "quantizer"))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("check", quantizer_checks(), ids=lambda c: c.__name__)
def test_builtin_formats_pass_the_conformance_kit(check, name, double_quant):
    cls = create_registry(load_entrypoints=False).get("quantizer", name)
    check(cls, {"double_quant": double_quant, "blocksize": 64})


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_nf4_fp4_are_bitsandbytes_interchangeable(name, double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from qlora_plugins.builtin_plugins.bnb_backend import to_bitsandbytes

    torch.manual_seed(1)
    linear = torch.nn.Linear(320, 96)
    model = torch.nn.Sequential(linear)
    q = make(name, double_quant=double_quant)
    q.quantize_model(model, [])
    layer = model[0]
    codes, state = bnb_f.quantize_4bit(linear.weight.data, blocksize=64, quant_type=name, compress_statistics=double_quant)
    assert torch.equal(codes.view(-1), layer.qweight.view(-1))
    if double_quant:
        assert torch.equal(state.absmax, layer.absmax_dq_q)
        assert torch.equal(state.state2.absmax, layer.absmax_dq_absmax)
        assert float(state.offset) == float(layer.absmax_dq_offset)
    else:
        assert torch.equal(state.absmax, layer.absmax)
    converted = to_bitsandbytes(layer)
    assert torch.equal(bnb_f.dequantize_4bit(converted.weight.data, converted.weight.quant_state), layer.dequantize(torch.float32))
    x = torch.randn(4, 320)
    assert torch.allclose(converted(x), layer(x), atol=1e-5)


@pytest.mark.parametrize(
    "name,double_quant,bits",
    [
        ("nf4", False, 4.5),
        ("nf4", True, 4 + 8 / 64 + 32 / (64 * 256)),
        ("int4_sym", False, 4.5),
        ("int4_asym", False, 5.0),
        ("int4_asym", True, 4 + 2 * (8 / 64 + 32 / (64 * 256))),
    ],
)
def test_bits_per_parameter(name, double_quant, bits):
    # 256 x 4096 = 16384 blocks of 64 = 64 second-level blocks: no partial blocks anywhere
    model = torch.nn.Sequential(torch.nn.Linear(4096, 256, bias=False))
    q = make(name, double_quant=double_quant)
    q.quantize_model(model, [])
    fp = q.footprint(model)
    assert fp.quantized_params == 4096 * 256
    # the double-quantization offset adds 32 bits per layer (per tensor of constants)
    extra = 32 * (2 if name == "int4_asym" else 1) / fp.quantized_params if double_quant else 0.0
    assert fp.bits_per_param == pytest.approx(bits + extra, abs=1e-9)


def test_packed_state_is_buffers_and_moves_and_gradients_flow():
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    make("nf4").quantize_model(model, [])
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert set(layer.state_dict()) >= {"qweight", "absmax_dq_q", "absmax_dq_absmax", "absmax_dq_offset", "bias"}
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.ones(3, 64) @ layer.dequantize(torch.float32)
    assert torch.allclose(x.grad, expected, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        assert layer.dequantize(dtype).dtype == dtype


def test_quant_linear_backward_keeps_no_dequantized_weight():
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))
    make("nf4").quantize_model(model, [])
    x = torch.randn(2, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = model(x)
    y.sum().backward()
    assert all(n < 512 * 512 for n in saved), f"a full weight-sized tensor was saved for backward: {saved}"


def test_vit_from_config_quantizes_and_runs():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    make("int4_asym").quantize_model(model, [])
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 6 + 1  # + pooler.dense
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bert_dir"])
def test_streamed_load_equals_quantize_after_load(fixture, request):
    from qlora_plugins.core.config import parse_config
    from qlora_plugins.core.pipeline import model_request

    model_dir = request.getfixturevalue(fixture)
    task = "seq_cls" if "bert" in fixture else "causal_lm"
    config = parse_config({"model": {"path": str(model_dir), "task": task}, "train": {"enabled": False}})
    req = model_request(config, model_dir, "cpu", 2)
    q = make("nf4")
    streamed = q.load_model(req)
    assert q.metadata()["load"] == "streamed"
    after = req.load_full_precision()
    make("nf4").quantize_model(after, req.skip_modules)
    s1, s2 = streamed.state_dict(), after.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key
    assert sum(isinstance(m, QuantLinear) for m in streamed.modules()) > 0


def test_nan_in_a_checkpoint_is_a_clear_cli_error(tiny_llama_dir, tmp_path):
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from qlora_plugins.cli import cli

    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_llama_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"path": str(bad)}, "train": {"enabled": False}}))
    result = CliRunner().invoke(cli, ["run", str(config), "-o", str(tmp_path / "out"), "--no-progress"], obj={})
    assert result.exit_code == 2, result.output
    assert "model.layers.1.mlp.up_proj" in result.output and "NaN" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "report.json").exists()


def test_encode_errors_name_the_layer():
    q = make("fp4")
    with pytest.raises(QuantizationError, match="blk.7"):
        q.encode(torch.tensor([1.0, float("inf")]), "blk.7")


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.slow
def test_pipeline_trains_with_every_format(name, tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"{i} {i}"}) + "\n" for i in range(12)))
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"path": str(tiny_llama_dir)},
                "quantizer": {"name": name, "blocksize": 128, "double_quant": True},
                "adapter": {"name": "lora", "r": 4},
                "optimizer": {"name": "adamw", "lr": 0.01},
                "data": {"name": "instruction", "path": str(data), "max_length": 48},
                "train": {"max_steps": 3, "batch_size": 4},
            }
        )
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(config), "-o", str(out), "--no-progress"], obj={})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["format"] == name
    assert report["quantization"]["blocksize"] == 128
    assert report["quantization"]["quantized_params"] == 786432
    assert (out / "exports" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("fixture,column", [("tiny_llama_dir", "perplexity"), ("tiny_bert_dir", "hidden_cosine")])
def test_quant_report_cli(fixture, column, request):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    model_dir = request.getfixturevalue(fixture)
    result = CliRunner().invoke(cli, ["quant-report", str(model_dir), "--double-quant", "--json"], obj={})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {r["quantizer"]: r for r in report["results"]}
    assert set(rows) == set(FORMATS)
    for row in rows.values():
        assert row["weight_mse"] > 0 and row["weight_sqnr_db"] > 10 and column in row
        assert row["worst_layers"][0]["sqnr_db"] <= row["weight_sqnr_db"] + 1e-9
    assert rows["nf4"]["bits_per_param"] == pytest.approx(4.128, abs=0.01)
    table = CliRunner().invoke(cli, ["quant-report", str(model_dir), "--quantizers", "nf4,int4_sym"], obj={})
    assert table.exit_code == 0 and "nf4" in table.output and "SQNR" in table.output


def test_quant_report_bad_input(tmp_path, tiny_llama_dir):
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    runner = CliRunner()
    missing = runner.invoke(cli, ["quant-report", str(tmp_path / "nope")], obj={})
    assert missing.exit_code == 2 and "not found" in missing.output
    unknown = runner.invoke(cli, ["quant-report", str(tiny_llama_dir), "--quantizers", "nf5"], obj={})
    assert unknown.exit_code == 2 and "did you mean 'nf4'" in unknown.output
    block = runner.invoke(cli, ["quant-report", str(tiny_llama_dir), "--blocksize", "100"], obj={})
    assert block.exit_code == 2 and "power of two" in block.output
