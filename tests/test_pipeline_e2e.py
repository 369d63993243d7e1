"""End to end: `qlora run` on tiny models, in-process through click's runner, and the run
directory it leaves (resolved config, metrics, report, loss curve, adapter, exports)."""

from __future__ import annotations

import json
import math
import statistics

import attrs
import pytest
import torch
import yaml
from conftest import CLASSIFY, CORPUS, INSTRUCTIONS, assert_user_error, base_config, invoke, new_registry, read_jsonl

from qlora_plugins import DataFormat, DataSplits, Exporter, Footprint, ModelSource, Optimizer, Quantizer, hookimpl
from qlora_plugins.modeling import iter_linear_layers

RUN_STEPS = 20


def lora_parameter_count(model_dir, r: int) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + (h + i) + (h + i) + (i + h)
    return c.num_hidden_layers * r * per_layer


def layer_sizes(model_dir) -> list[int]:
    """Parameter counts of the quantized linears of a Llama checkpoint."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return c.num_hidden_layers * [h * h, h * kv, h * kv, h * h, h * i, h * i, i * h]


def quantized_count(model_dir) -> int:
    return sum(layer_sizes(model_dir))


def dq_bytes(numel: int, blocksize: int = 64) -> int:
    """4-bit codes + 8-bit absmax per block + fp32 scale per 256 absmax + fp32 offset."""
    blocks = math.ceil(numel / blocksize)
    return numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, tiny_llama_dir):
    """One QLoRA run through the CLI: nf4 (+DQ) + LoRA + paged_adamw + instruction data, 20 steps."""
    root = tmp_path_factory.mktemp("recipe")
    config = base_config(
        quantizer={"name": "nf4", "blocksize": 64, "double_quant": True},
        adapter={"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        optimizer={"name": "paged_adamw", "lr": 1e-2},
        train={
            "max_steps": RUN_STEPS,
            "batch_size": 4,
            "eval_every": 10,
            "lr_scheduler": "constant",
            "seed": 0,
            "gradient_checkpointing": True,
        },
    )
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = root / "run"
    result = invoke("run", path, "--output", out, "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    return result, out, path


@pytest.mark.slow
def test_run_prints_a_summary(recipe_run):
    result, out, _ = recipe_run
    assert "qlora run: completed" in result.stdout
    for row in ("plugins", "quantized", "bits/param", "steps", "eval loss", "peak memory", "run directory"):
        assert row in result.stdout, row
    assert "paged_adamw: no CUDA device" in result.stdout or torch.cuda.is_available()
    assert "Traceback" not in result.output


def test_run_directory_contents(recipe_run):
    _, out, _ = recipe_run
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "report.json", "loss.png", "adapter", "exports", "run.json"} <= names
    assert not [n for n in names if n.startswith(".")], names  # no temporary leftovers
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for directory in (out / "adapter", out / "exports" / "adapter"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in directory.iterdir()}
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_resolved_config_has_every_default(recipe_run, tiny_llama_dir):
    _, out, _ = recipe_run
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert list(resolved) == ["model", "quantizer", "adapter", "optimizer", "data", "train", "export", "track"]
    assert resolved["model"]["source"] is None and resolved["model"]["path"] == str(tiny_llama_dir)
    assert resolved["quantizer"]["name"] == "nf4" and resolved["quantizer"]["blocksize"] == 64
    assert resolved["quantizer"]["double_quant"] is True and "compute_dtype" in resolved["quantizer"]
    assert resolved["adapter"]["r"] == 8 and resolved["adapter"]["dropout"] == 0.05
    assert resolved["optimizer"] == {"name": "paged_adamw", "lr": 0.01, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
    assert resolved["data"]["path"] == str(INSTRUCTIONS) and resolved["data"]["max_length"] == 64
    assert resolved["train"]["max_steps"] == RUN_STEPS and resolved["train"]["keep_checkpoints"] == 2
    assert resolved["export"] == [{"name": "adapter"}]
    assert resolved["track"] == [{"name": "jsonl"}]


def test_resolved_config_validates_again(recipe_run):
    _, out, _ = recipe_run
    result = invoke("validate", out / "config.yaml")
    assert result.exit_code == 0, result.output


def test_metrics_have_a_loss_per_step_and_eval_losses(recipe_run):
    _, out, _ = recipe_run
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, RUN_STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] == pytest.approx(1e-2) and r["tokens"] > 0 for r in steps)
    assert [r["step"] for r in evals] == [10, 20]
    assert all(math.isfinite(r["eval_loss"]) for r in evals)


def test_loss_falls(recipe_run):
    _, out, _ = recipe_run
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    first, last = statistics.fmean(losses[:3]), statistics.fmean(losses[-3:])
    # a random-init base learns the answers' token distribution first: ln(vocab) ~5.5 to ~4.8
    assert last < first - 0.3, losses
    evals = [r["eval_loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < losses[0] - 0.4, (losses[0], evals)


def test_report(recipe_run, tiny_llama_dir):
    _, out, path = recipe_run
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and report["config"] == str(path) and report["run_dir"] == str(out.resolve())
    plugins = report["plugins"]
    for kind, name in (("quantizer", "nf4"), ("adapter", "lora"), ("optimizer", "paged_adamw"), ("data", "instruction")):
        assert plugins[kind]["name"] == name
        assert plugins[kind]["distribution"] == "qlora-plugins" and plugins[kind]["version"]
    assert plugins["quantizer"]["options"]["blocksize"] == 64
    assert [e["name"] for e in plugins["exporters"]] == ["adapter"]
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "qlora-plugins"} <= set(report["versions"])

    params = report["parameters"]
    assert params["trainable"] == lora_parameter_count(tiny_llama_dir, r=8)
    assert params["quantized"] == quantized_count(tiny_llama_dir)
    assert params["total"] > params["quantized"] > params["trainable"] > 0
    assert params["trainable_percent"] == pytest.approx(100 * params["trainable"] / params["total"])

    quant = report["quantization"]
    assert quant["quantized_params"] == params["quantized"]
    expected_bytes = sum(dq_bytes(n) for n in layer_sizes(tiny_llama_dir))
    assert quant["quantized_bytes"] == expected_bytes
    assert quant["bits_per_param"] == pytest.approx(8 * expected_bytes / quant["quantized_params"])
    assert quant["bits_per_param"] == pytest.approx(4.127, abs=0.002)
    assert quant["format"] == "nf4" and quant["double_quant"] is True and quant["blocksize"] == 64

    training = report["training"]
    assert training["steps"] == RUN_STEPS and training["train_examples"] == 36 and training["eval_examples"] == 4
    assert training["median_step_time_s"] > 0 and training["mean_step_time_s"] > 0
    assert training["eval_loss"] == pytest.approx(read_jsonl(out / "metrics.jsonl")[-1]["eval_loss"])
    assert report["memory"]["peak_rss_bytes"] > 10_000_000
    assert 10_000_000 < report["memory"]["load_peak_rss_bytes"] <= report["memory"]["peak_rss_bytes"]
    assert set(report["timings"]) >= {"load_s", "train_s", "export_s", "total_s"}
    assert report["exports"]["adapter"]["path"] == str(out.resolve() / "exports" / "adapter")
    assert "adapter_model.safetensors" in report["exports"]["adapter"]["files"]
    if not torch.cuda.is_available():
        assert any("paged_adamw" in note and "CUDA" in note for note in report["notes"])
    assert report["loss_plot"] == str(out.resolve() / "loss.png")


def test_exported_adapter_loads_onto_the_base_model(recipe_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = recipe_run
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = PeftModel.from_pretrained(base, str(out / "exports" / "adapter")).eval()
    trainable_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trainable_b and any(p.abs().sum() > 0 for p in trainable_b)  # trained, not the zero init
    with torch.no_grad():
        logits = model(torch.tensor([[1, 40, 50, 60]])).logits
    assert torch.isfinite(logits).all()


def test_train_disabled_quantizes_and_exports_only(tmp_path, write_config):
    path = write_config(base_config(data=None, train={"enabled": False}))
    out = tmp_path / "run"
    result = invoke("run", path, "-o", out, "--no-progress", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert report["status"] == "completed" and "training" not in report
    assert "data" not in report["plugins"]
    assert report["quantization"]["bits_per_param"] == pytest.approx(4.127, abs=0.002)
    assert (out / "exports" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "loss.png").exists() and read_jsonl(out / "metrics.jsonl") == []
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] is None

    # a previous run directory is replaced with --force, refused without
    marker = out / "report.json"
    before = marker.read_text()
    refused = invoke("run", path, "-o", out, "--no-progress")
    assert_user_error(refused, "exists and is not empty", "--force")
    assert marker.read_text() == before
    again = invoke("run", path, "-o", out, "--no-progress", "--force", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["status"] == "completed"


@pytest.mark.slow
def test_sequence_classification_with_an_encoder(tmp_path, write_config, tiny_bert_dir):
    config = base_config(
        model={"source": "tiny-bert", "task": "seq_cls"},
        adapter={"name": "lora", "r": 4},
        data={"name": "classification", "path": str(CLASSIFY), "max_length": 32, "eval_fraction": 0.25},
        train={"max_steps": 4, "batch_size": 4},
    )
    out = tmp_path / "run"
    result = invoke("run", write_config(config), "-o", out, "--no-progress", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert report["model"]["task"] == "seq_cls" and report["plugins"]["data"]["name"] == "classification"
    assert report["training"]["steps"] == 4 and report["training"]["eval_examples"] == 6
    assert 0.0 <= report["training"]["eval_accuracy"] <= 1.0
    assert report["parameters"]["quantized"] > 0 and report["parameters"]["trainable"] > 0
    adapter_config = json.loads((out / "exports" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    # the fresh classification head is trained and saved alongside the adapter
    from safetensors.torch import load_file

    assert any("classifier" in k for k in load_file(str(out / "exports" / "adapter" / "adapter_model.safetensors")))


@pytest.mark.slow
def test_gpt2_causal_lm_with_text_data(tmp_path, write_config, tiny_gpt2_dir):
    config = base_config(
        model={"source": "tiny-gpt2"},
        quantizer={"name": "fp4", "double_quant": False},
        adapter={"name": "lora", "r": 4},
        data={"name": "text", "path": str(CORPUS), "max_length": 64},
        train={"max_steps": 3, "batch_size": 2},
    )
    out = tmp_path / "run"
    result = invoke("run", write_config(config), "-o", out, "--no-progress", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    # GPT-2's projections are Conv1D layers: 2 blocks x (c_attn 64x192, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64)
    assert report["parameters"]["quantized"] == 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)
    assert report["quantization"]["bits_per_param"] == 4.5
    assert report["parameters"]["trainable"] == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert report["training"]["steps"] == 3 and math.isfinite(report["training"]["last_loss"])


# --- every kind of plugin can come from outside the core --------------------------------------


class SmallLlama(ModelSource):
    """A one-layer Llama made by a test plugin."""

    name = "test-small-llama"

    def materialize(self, directory):
        from transformers import LlamaConfig, LlamaForCausalLM

        from qlora_plugins.builtin_plugins.model_sources import byte_level_tokenizer

        tok = byte_level_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
        tok.save_pretrained(str(directory))


class RowInt8(Quantizer):
    """Fake 8-bit: rounds each row to 255 levels of its absmax (weights stay nn.Linear)."""

    name = "test-row-int8"

    def quantize_model(self, model, skip_modules):
        self.shapes = []
        with torch.no_grad():
            for _, layer in iter_linear_layers(model, skip_modules):
                scale = layer.weight.abs().amax(dim=1, keepdim=True) / 127
                layer.weight.copy_(torch.round(layer.weight / scale) * scale)
                self.shapes.append(tuple(layer.weight.shape))

    def footprint(self, model):
        params = sum(o * i for o, i in self.shapes)
        return Footprint(params, params + 4 * sum(o for o, _ in self.shapes))

    def metadata(self):
        return {"format": "int8-rows"}


class Sgd(Optimizer):
    """Plain SGD with momentum."""

    name = "test-sgd"

    def create(self, params, device):
        return torch.optim.SGD(params, lr=self.options.lr, momentum=0.9)


@attrs.define
class CountOptions:
    count: int = 12


class Counting(DataFormat):
    """Generated data: 'count to N' with the numbers as the answer (no file)."""

    name = "test-counting"
    Options = CountOptions
    tasks = ("causal_lm",)

    def load(self, context):
        examples = []
        for n in range(2, 2 + self.options.count):
            prompt = context.tokenizer(f"count {n}:", add_special_tokens=False)["input_ids"]
            answer = context.tokenizer(" " + " ".join(str(k) for k in range(1, n + 1)), add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
        return DataSplits(examples[2:], examples[:2])


class TrainableList(Exporter):
    """Writes the names and shapes of the trained tensors as JSON."""

    name = "test-trainable-list"

    def export(self, context, output_dir):
        names = {n: list(p.shape) for n, p in context.model.named_parameters() if "lora_" in n}
        (output_dir / "trainable.json").write_text(json.dumps(names))
        return {"format": "json", "tensors": len(names)}


class EveryKind:
    @hookimpl
    def register_model_sources(register):
        register(SmallLlama)

    @hookimpl
    def register_quantizers(register):
        register(RowInt8)

    @hookimpl
    def register_optimizers(register):
        register(Sgd)

    @hookimpl
    def register_data_formats(register):
        register(Counting)

    @hookimpl
    def register_exporters(register):
        register(TrainableList)

    @hookimpl
    def register_adapters(register):
        from qlora_plugins.builtin_plugins.adapter_lora import Lora

        class NarrowLora(Lora):
            """LoRA on the attention projections only, r=2."""

            name = "test-narrow-lora"

            def __init__(self, options=None):
                super().__init__(attrs.evolve(options or self.Options(), r=2, target_modules=["q_proj", "v_proj"]))

        register(NarrowLora)


@pytest.mark.slow
def test_a_pipeline_built_entirely_from_plugins(tmp_path, qlora_home):
    """Model source, quantizer, adapter, optimizer, data and exporter all from one test plugin:
    the extension API is enough to swap every stage."""
    from qlora_plugins.core import pipeline
    from qlora_plugins.core.config import parse_config

    registry = new_registry(plugins=[EveryKind])
    assert registry.broken == []
    config = parse_config(
        {
            "model": {"source": "test-small-llama"},
            "quantizer": "test-row-int8",
            "adapter": "test-narrow-lora",
            "optimizer": {"name": "test-sgd", "lr": 0.05},
            "data": {"name": "test-counting", "count": 10},
            "train": {"max_steps": 3, "batch_size": 4},
            "export": ["test-trainable-list", "adapter"],
        }
    )
    logs = []
    report = pipeline.run(config, registry, tmp_path / "run", log=logs.append, progress=False)
    assert (qlora_home / "models" / "test-small-llama-v1" / "config.json").is_file()
    assert {k: v["name"] for k, v in report["plugins"].items() if isinstance(v, dict)} == {
        "quantizer": "test-row-int8",
        "adapter": "test-narrow-lora",
        "optimizer": "test-sgd",
        "data": "test-counting",
    }
    assert all(v["distribution"] == "local" for k, v in report["plugins"].items() if isinstance(v, dict))
    # 1 layer: q, k, v, o 64x64 and gate, up, down 64<->128
    params = 4 * 64 * 64 + 3 * 64 * 128
    assert report["quantization"] == {
        "quantized_params": params,
        "quantized_bytes": params + 4 * (4 * 64 + 2 * 128 + 64),
        "bits_per_param": pytest.approx(8 * (params + 4 * (4 * 64 + 2 * 128 + 64)) / params),
        "format": "int8-rows",
    }
    assert report["parameters"]["trainable"] == 2 * ((64 + 64) + (64 + 64))
    assert report["training"]["steps"] == 3 and report["training"]["train_examples"] == 8
    listed = json.loads((tmp_path / "run" / "exports" / "test-trainable-list" / "trainable.json").read_text())
    assert len(listed) == 4 and all(".q_proj." in n or ".v_proj." in n for n in listed)
    assert report["exports"]["test-trainable-list"]["tensors"] == 4
    assert (tmp_path / "run" / "exports" / "adapter" / "adapter_model.safetensors").is_file()
    assert any("test-row-int8" in line for line in logs)
