"""``model.frozen_dtype``: frozen unquantized weights (embeddings, head) in 16 bits, compute in
fp32: the same results as an fp32 model holding the rounded weights, half the bytes, loaded
straight into 16-bit storage, and refused for adapters that would train those weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, base_config, invoke, new_registry
from torch import nn

from qlora_plugins.core import frozen
from qlora_plugins.core.interfaces import AdapterContext, ModelRequest
from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, auto_class
from qlora_plugins.core.training import prepare_for_kbit_training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_and_embedding_compute_in_fp32_on_rounded_weights(dtype, monkeypatch):
    monkeypatch.setattr(frozen, "TILE_BYTES", 64)  # several tiles, a partial last one
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 12), nn.Linear(12, 23))
    for p in model.parameters():
        p.requires_grad_(False)
    rounded = nn.Sequential(nn.Embedding(50, 12), nn.Linear(12, 23))
    rounded.load_state_dict(
        {k: v.to(dtype).float() for k, v in model.state_dict().items() if k.endswith("weight")} | {"1.bias": model[1].bias.data},
        strict=True,
    )
    assert sorted(frozen.keep_frozen_16bit(model, dtype, torch.float32)) == ["0", "1"]
    assert model[0].weight.dtype == dtype and model[1].weight.dtype == dtype and model[1].bias.dtype == torch.float32
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    emb = model[0](ids)
    assert emb.dtype == torch.float32 and torch.equal(emb, rounded[0](ids))
    x = torch.randn(3, 7, 12, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = model[1](x), rounded[1](x_ref)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert frozen.keep_frozen_16bit(model, dtype, torch.float32) == ["0", "1"]  # idempotent


def test_trainable_weights_are_refused():
    with pytest.raises(ValueError, match="trainable"):
        frozen.keep_frozen_16bit(nn.Linear(4, 4), torch.bfloat16, torch.float32)


def test_quantized_llama_with_16bit_frozen_weights(tiny_llama_dir):
    def load(frozen_dtype):
        q = new_registry().create("quantizer", "nf4", {})
        request = ModelRequest(
            path=tiny_llama_dir,
            task="causal_lm",
            auto_class=auto_class("causal_lm"),
            dtype=torch.float32,
            skip_modules=list(DEFAULT_SKIP_MODULES),
            frozen_dtype=frozen_dtype,
        )
        model = q.load_model(request)
        prepare_for_kbit_training(model, True)
        if frozen_dtype is not None:
            frozen.keep_frozen_16bit(model, frozen_dtype, torch.float32)
        return model

    base, half = load(None), load(torch.bfloat16)
    embed = half.model.embed_tokens.weight
    assert embed.dtype == torch.bfloat16  # loaded straight into 16-bit storage
    assert torch.equal(embed.float(), base.model.embed_tokens.weight.to(torch.bfloat16).float())
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert all(n.weight.dtype == torch.float32 for n in half.modules() if type(n).__name__.endswith("RMSNorm"))
    # fp32 compute on rounded weights: the losses agree to bf16's rounding of those weights
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)) and type(module) in (nn.Embedding, nn.Linear):
                module.weight.copy_(module.weight.to(torch.bfloat16).float())
    batch = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (base, half):
        model = new_registry().create("adapter", "lora", {"r": 4, "dropout": 0.0}).attach(model, AdapterContext("causal_lm", True))
        model.train()
        out = model(input_ids=batch, labels=batch)
        assert out.logits.dtype == torch.float32
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_pipeline_option_and_its_refusal(tmp_path, write_config):
    cfg = base_config()
    cfg["model"]["frozen_dtype"] = "bfloat16"
    result = invoke("run", write_config(cfg), "-o", tmp_path / "run", "--no-progress", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["status"] == "completed"
    cfg["adapter"] = {"name": "full"}
    cfg["quantizer"] = {"name": "none"}
    refused = invoke("run", write_config(cfg, "full.yaml"), "-o", tmp_path / "run2", "--no-progress")
    assert_user_error(refused, "model.frozen_dtype")


def test_quant_report_measures_the_option(tiny_llama_dir):
    result = invoke("quant-report", tiny_llama_dir, "--quantizers", "nf4", "--frozen-dtype", "bfloat16", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    rows = json.loads(result.stdout)["results"]
    assert [r["quantizer"] for r in rows] == ["nf4", "nf4+frozen-bfloat16"]
    assert rows[0]["bits_per_param"] == rows[1]["bits_per_param"]
    # rounding the embeddings and head to bf16 moves perplexity by far less than 4-bit weights do
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=0.01)
