"""A core that knows no builtin: a quantizer and an adapter written here against the public API
only (no peft, no builtin format) go through training, checkpoints, resume and every builtin
exporter, exactly like the builtins do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qlora_plugins import Adapter, MergeTarget, SavedAdapter, hookimpl
from qlora_plugins.modeling import set_submodule
from qlora_plugins.quantized import BlockwiseQuantizer
from qlora_plugins.testing import make_registry, run_cli, tiny_model_dir

DATA = Path(__file__).resolve().parent / "data" / "instructions.jsonl"


class Int8Rows(BlockwiseQuantizer):
    """Symmetric 8-bit codes with one absmax per block (a format no builtin implements)."""

    name = "fake_int8"

    def encode_blocks(self, weight, blocksize):
        flat = weight.float().reshape(-1)
        pad = -flat.numel() % blocksize
        blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
        absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
        codes = torch.round(blocks / absmax[:, None] * 127).to(torch.int8).view(-1)[: flat.numel()]
        return {"qweight": codes.view(torch.uint8), "absmax": absmax.contiguous()}

    def decode_blocks(self, state, numel, blocksize, dtype):
        codes = state["qweight"].view(torch.int8)[:numel].float()
        block = torch.arange(numel, device=codes.device) // blocksize
        return (codes / 127 * state["absmax"].float()[block]).to(dtype)

    def planned_bytes(self, numel):
        """One byte a weight, an fp32 absmax a block (double quantization is off in these tests)."""
        return numel, 4 * -(-numel // self.options.blocksize)


class LowRankLayer(torch.nn.Module):
    """``base(x) + x A^T B^T``, written from scratch (B starts at zero, so training starts at the base)."""

    def __init__(self, base: torch.nn.Module, r: int) -> None:
        super().__init__()
        self.base_layer = base
        self.a = torch.nn.Parameter(torch.randn(r, base.in_features) * 0.02)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base_layer(x) + (x.float() @ self.a.t() @ self.b.t()).to(x.dtype)


class FakeLowRank(Adapter):
    """A low-rank adapter on q_proj and v_proj without peft."""

    name = "fake_lowrank"
    TARGETS = ("q_proj", "v_proj")
    RANK = 4

    def attach(self, model, context):
        names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in self.TARGETS]
        for name in names:
            set_submodule(model, name, LowRankLayer(model.get_submodule(name), self.RANK))
        return model

    def layers(self, model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLayer)]

    def save(self, model, directory):
        tensors = {f"{n}.{p}": getattr(m, p).detach().contiguous().cpu() for n, m in self.layers(model) for p in ("a", "b")}
        save_file(tensors, str(directory / "lowrank.safetensors"))
        (directory / "lowrank.json").write_text(json.dumps({"rank": self.RANK, "targets": list(self.TARGETS)}))

    def load(self, model, directory, context):
        model = self.attach(model, context)
        weights = load_file(str(directory / "lowrank.safetensors"))
        with torch.no_grad():
            for name, layer in self.layers(model):
                layer.a.copy_(weights[f"{name}.a"])
                layer.b.copy_(weights[f"{name}.b"])
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def merge_targets(self, model):
        return [MergeTarget(name, layer.base_layer, (layer.b @ layer.a).detach().float()) for name, layer in self.layers(model)]

    def unwrap(self, model):
        for name, layer in self.layers(model):
            set_submodule(model, name, layer.base_layer)
        return model

    def saved_info(self, directory):
        return SavedAdapter(base_model=None)

    def planned_trainable(self, layers, arch):
        return sum(
            self.RANK * (shape.in_features + shape.out_features) * shape.count
            for shape in layers
            if shape.name.rsplit(".", 1)[-1] in self.TARGETS
        )

    def planned_activations(self, compute_dtype, dtype_bytes):
        from qlora_plugins.planning import ActivationCoefficients

        return ActivationCoefficients(h=40.0, i=12.0, kv=8.0, c=0.0)


class FakePlugins:
    @hookimpl
    def register_quantizers(self, register):
        register(Int8Rows)

    @hookimpl
    def register_adapters(self, register):
        register(FakeLowRank)


def write_config(path: Path, steps: int, exports: list) -> Path:
    config = {
        "model": {"path": str(tiny_model_dir("tiny-llama"))},
        "quantizer": {"name": "fake_int8", "blocksize": 64, "double_quant": False},
        "adapter": {"name": "fake_lowrank"},
        "optimizer": {"name": "adamw", "lr": 5e-3},
        "data": {"name": "instruction", "path": str(DATA), "max_length": 64},
        "train": {
            "max_steps": steps,
            "batch_size": 4,
            "seed": 0,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
        },  # a 2-step run resumed to 4 takes the same steps as a 4-step run
        "export": exports,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, qlora_home):
    """An uninterrupted 4-step run with every builtin exporter, and a 2-step run resumed to 4."""
    root = tmp_path_factory.mktemp("fakes")
    registry = make_registry([FakePlugins()])
    exports = [{"name": "adapter"}, {"name": "merged"}, {"name": "merged_4bit", "tolerance": {"max_kl": 0.05, "min_top1": 0.0}}]
    full = run_cli("run", write_config(root / "full.yaml", 4, exports), "-o", root / "full", "--no-progress", registry=registry)
    short = write_config(root / "short.yaml", 2, [])
    part = run_cli("run", short, "-o", root / "resumed", "--no-progress", registry=make_registry([FakePlugins()]))
    longer = write_config(root / "short.yaml", 4, [])
    resumed = run_cli("run", longer, "--resume", root / "resumed", "--no-progress", registry=make_registry([FakePlugins()]))
    return {"root": root, "full": full, "part": part, "resumed": resumed}


def test_training_with_a_third_party_quantizer_and_adapter(runs):
    assert runs["full"].exit_code == 0, runs["full"].output
    report = json.loads((runs["root"] / "full" / "report.json").read_text())
    assert report["plugins"]["quantizer"]["name"] == "fake_int8" and report["plugins"]["adapter"]["name"] == "fake_lowrank"
    assert report["quantization"]["quantized_params"] > 0
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir("tiny-llama")))
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = FakeLowRank.RANK * (2 * cfg.hidden_size) + FakeLowRank.RANK * (cfg.hidden_size + kv)  # q_proj and v_proj
    assert report["parameters"]["trainable"] == cfg.num_hidden_layers * per_layer  # the adapter's weights and nothing else
    assert report["training"]["last_loss"] < report["training"]["first_loss"]


def test_every_builtin_exporter_works_through_the_contract(runs):
    exports = json.loads((runs["root"] / "full" / "report.json").read_text())["exports"]
    assert set(exports) == {"adapter", "merged", "merged_4bit"}
    for name, facts in exports.items():
        assert facts["fidelity"]["status"] == "passed", (name, facts["fidelity"])
    assert exports["merged"]["fidelity"]["top1"] == 1.0 and exports["merged"]["fidelity"]["kl"] < 1e-6
    merged = runs["root"] / "full" / "exports" / "merged"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged))  # a plain checkpoint: no plugin needed
    assert not any("base_layer" in n for n, _ in model.named_modules())


def test_checkpoints_and_resume_through_the_contract(runs):
    assert runs["part"].exit_code == 0, runs["part"].output
    assert runs["resumed"].exit_code == 0, runs["resumed"].output
    report = json.loads((runs["root"] / "resumed" / "report.json").read_text())
    assert report["training"]["resumed_from_step"] == 2
    full = load_file(str(runs["root"] / "full" / "adapter" / "lowrank.safetensors"))
    resumed = load_file(str(runs["root"] / "resumed" / "adapter" / "lowrank.safetensors"))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # bit for bit: the resume is exact


def test_plan_through_the_contract(runs):
    """qlora plan asks the fake plugins (planned_bytes, planned_trainable): its figures are the
    ones the run measured."""
    model = yaml.safe_load((runs["root"] / "full.yaml").read_text())["model"]["path"]
    result = run_cli(
        "plan",
        model,
        "--quantizer",
        "fake_int8",
        "--no-double-quant",
        "--adapter",
        "fake_lowrank",
        "--json",
        registry=make_registry([FakePlugins()]),
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    report = json.loads((runs["root"] / "full" / "report.json").read_text())
    assert plan["trainable_params"] == report["parameters"]["trainable"]
    rows = {r["component"]: r for r in plan["rows"]}
    assert rows["base_weights"]["device_bytes"] + rows["quant_constants"]["device_bytes"] == report["quantization"]["quantized_bytes"]
