"""Memory paths of loading and training a quantized model: quantize-while-loading reads without
mapping the file and copies big unquantized tensors in chunks; QuantLinear's reusable
dequantization workspace gives exactly the fresh path's results and never serves a stale weight."""

from __future__ import annotations

import torch
from conftest import new_registry

from qlora_plugins.core import quant_linear as ql
from qlora_plugins.core import streaming
from qlora_plugins.core.interfaces import AdapterContext, ModelRequest
from qlora_plugins.core.modeling import DEFAULT_SKIP_MODULES, auto_class


def load_quantized(path, name="nf4", options=None):
    q = new_registry().create("quantizer", name, options or {})
    request = ModelRequest(
        path=path, task="causal_lm", auto_class=auto_class("causal_lm"), dtype=torch.float32, skip_modules=list(DEFAULT_SKIP_MODULES)
    )
    return q, q.load_model(request)


def test_chunked_copy_equals_from_pretrained(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(streaming, "COPY_CHUNK_BYTES", 4096)  # force many chunks (and a ragged last one)
    reads = []
    real_pread = streaming.os.pread
    monkeypatch.setattr(streaming.os, "pread", lambda fd, n, offset: reads.append(n) or real_pread(fd, n, offset))
    q, model = load_quantized(tiny_llama_dir)
    # the chunks are read from the file one by one (safetensors' slices would read the whole tensor)
    assert len(reads) > 10 and max(reads) <= 4096
    assert q.metadata()["load"] == "streamed"
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    torch.testing.assert_close(model.model.embed_tokens.weight, reference.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)


_SUPPORTS_WORKSPACE = ql._supports_workspace


def _loss_and_grads(model, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_workspace_matches_fresh_dequantization(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("QLORA_PLUGINS_MATMUL", "whole")  # the path that decodes whole weights
    for name, options in (("nf4", {}), ("int4_asym", {"double_quant": False})):
        _, model = load_quantized(tiny_llama_dir, name, options)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = new_registry().create("adapter", "lora", {"r": 4, "dropout": 0.0}).attach(model, AdapterContext("causal_lm", True))
        model.train()
        batch = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
        ql.release_dequant_workspaces()
        ql._accepts_out.clear()
        with_workspace = _loss_and_grads(model, batch)
        layer_types = {type(m.quantizer) for m in model.modules() if isinstance(m, ql.QuantLinear)}
        assert all(ql._accepts_out[t] for t in layer_types), name  # the builtin formats decode into out=
        monkeypatch.setattr(ql, "_supports_workspace", lambda quantizer: False)
        fresh = _loss_and_grads(model, batch)
        monkeypatch.setattr(ql, "_supports_workspace", _SUPPORTS_WORKSPACE)
        assert with_workspace[0] == fresh[0]
        for a, b in zip(with_workspace[1], fresh[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_workspace_never_serves_a_stale_weight(tiny_llama_dir):
    _, model = load_quantized(tiny_llama_dir)
    layer = model.model.layers[0].mlp.down_proj
    ql.release_dequant_workspaces()
    first = layer.dequantize_transient(torch.float32).clone()
    torch.testing.assert_close(first, layer.dequantize(torch.float32), rtol=0, atol=0)
    layer.requantize(first * 2)  # new packed tensors (as a merge does)
    torch.testing.assert_close(layer.dequantize_transient(torch.float32), layer.dequantize(torch.float32), rtol=0, atol=0)
    with torch.no_grad():
        layer.qweight.zero_()  # in place: the version counter changes
    torch.testing.assert_close(layer.dequantize_transient(torch.float32), layer.dequantize(torch.float32), rtol=0, atol=0)
    other = model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(other.dequantize_transient(torch.float32), other.dequantize(torch.float32), rtol=0, atol=0)


def test_release_free_memory_is_harmless():
    streaming.release_free_memory()


def test_heap_fragmentation_limit_respects_the_users_malloc_settings(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))

    monkeypatch.setattr(streaming, "_libc", lambda: FakeLibc())
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in streaming._MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    streaming.limit_heap_fragmentation()
    assert calls == [(streaming._M_MMAP_THRESHOLD, streaming.MMAP_THRESHOLD_BYTES)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    streaming.limit_heap_fragmentation()
    assert len(calls) == 1
