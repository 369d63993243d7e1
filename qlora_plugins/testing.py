"""Conformance kit for quantizer authors.

Run every check against your quantizer class from your own test suite::

    from qlora_plugins.testing import quantizer_checks

    @pytest.mark.parametrize("check", quantizer_checks(), ids=lambda c: c.__name__)
    def test_conformance(check):
        check(MyQuantizer, {"blocksize": 64})

Each check takes the quantizer class and an options mapping (as in a config section) and raises
``AssertionError`` with a precise message when the quantizer breaks the contract. The builtin
formats run these same checks in the project's test suite.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from qlora_plugins.core.options import build_options

#: A conformance check: called with the quantizer class and an options mapping (or None).
Check = Callable[[type, "dict | None"], None]

__all__ = [
    "Check",
    "check_dtypes",
    "check_lora_train_and_merge",
    "check_quant_linear",
    "check_rejects_bad_input",
    "check_round_trip",
    "make_registry",
    "quantizer_checks",
    "run_cli",
    "run_quantizer_checks",
    "tiny_model_dir",
]


def _make(cls: type[Any], options: dict | None) -> Any:
    return cls(build_options(cls.Options, options or {}, "quantizer"))


def _weight(rows: int = 96, cols: int = 160, seed: int = 0, dtype: Any = None) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, 0] = 0.11  # an outlier, as trained weights have
    return w.to(dtype or torch.float32)


def _relative_mse(a: Any, b: Any) -> float:
    return float(((a.float() - b.float()) ** 2).mean() / (b.float() ** 2).mean())


def check_round_trip(cls: type, options: dict | None = None, max_relative_mse: float = 0.05) -> None:
    """encode/decode reproduces a Gaussian weight with relative MSE below ``max_relative_mse``
    (4-bit formats reach ~0.01), for a shape that is not a multiple of the blocksize."""
    q = _make(cls, options)
    w = _weight(97, 131)
    state = q.encode(w, "probe")
    back = q.decode(state, tuple(w.shape), w.dtype)
    assert back.shape == w.shape, f"decode returned shape {tuple(back.shape)}, expected {tuple(w.shape)}"
    err = _relative_mse(back, w)
    assert err < max_relative_mse, f"relative MSE {err:.4f} exceeds {max_relative_mse}"
    zeros = q.decode(q.encode(w * 0, "zeros"), tuple(w.shape), w.dtype)
    assert bool((zeros == 0).all()), "an all-zero weight must decode to zeros"


def check_dtypes(cls: type, options: dict | None = None) -> None:
    """fp32, bf16 and fp16 weights encode; decode honours the requested output dtype."""
    import torch

    q = _make(cls, options)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = _weight(dtype=dtype)
        state = q.encode(w, "probe")
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            back = q.decode(state, tuple(w.shape), out_dtype)
            assert back.dtype == out_dtype, f"decode to {out_dtype} returned {back.dtype}"
            assert _relative_mse(back, w) < 0.1, f"{dtype} -> {out_dtype}: reconstruction too far off"


def check_rejects_bad_input(cls: type, options: dict | None = None) -> None:
    """NaN/Inf, empty and integer weights raise QuantizationError naming the layer."""
    import torch

    from qlora_plugins.errors import QuantizationError

    q = _make(cls, options)
    bad = {
        "nan": _weight().index_fill(0, torch.tensor([1]), float("nan")),
        "empty": torch.empty(0, 8),
        "int": torch.ones(8, 8, dtype=torch.int32),
    }
    for label, w in bad.items():
        try:
            q.encode(w, f"layer.{label}")
        except QuantizationError as exc:
            assert f"layer.{label}" in str(exc), f"error for {label} input does not name the layer: {exc}"
        else:
            raise AssertionError(f"{label} weight was accepted")


def _tiny_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))


def check_quant_linear(cls: type, options: dict | None = None) -> None:
    """quantize_model replaces Linear layers; outputs track the float model; buffers not
    parameters; state_dict round-trips through safetensors; .to() moves the packed state."""
    import torch
    from safetensors.torch import load_file, save_file

    from qlora_plugins.core.quant_linear import QuantLinear

    q = _make(cls, options)
    ref = _tiny_model()
    model = _tiny_model()
    q.quantize_model(model, [])
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2, f"expected 2 QuantLinear layers, found {len(layers)}"
    assert not any(p.dtype in (torch.uint8, torch.int8) for p in model.parameters()), "packed weights must be buffers"
    x = torch.randn(4, 64)
    cos = torch.nn.functional.cosine_similarity(model(x).flatten(), ref(x).flatten(), dim=0)
    assert cos > 0.97, f"quantized model output cosine similarity {cos:.4f} < 0.97"
    fp = q.footprint(model)
    assert fp.quantized_params == 64 * 96 * 2, f"footprint counts {fp.quantized_params} params"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        loaded = load_file(str(path))
    fresh = _tiny_model()
    q.quantize_model(fresh, [])
    for name, module in fresh.named_modules():
        if isinstance(module, QuantLinear):
            module.load_state({k[len(name) + 1 :]: v for k, v in loaded.items() if k.startswith(name + ".")})
    assert torch.equal(fresh(x), model(x)), "outputs differ after a safetensors round-trip of the state"
    moved = model.to("cpu")
    assert all(t.device.type == "cpu" for layer in layers for t in layer.state().values())
    if torch.cuda.is_available():
        moved = model.to("cuda")
        assert torch.allclose(moved(x.cuda()).cpu(), model.to("cpu")(x), atol=1e-3)


def _tiny_llama() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def check_lora_train_and_merge(cls: type, options: dict | None = None) -> None:
    """The registered ``lora`` adapter wraps the quantized layers of a tiny Llama, one step trains
    only the adapters and the input gradient flows, and merging keeps outputs close to the
    unmerged model."""
    import torch

    from qlora_plugins.core.interfaces import AdapterContext
    from qlora_plugins.core.registry import create_registry

    q = _make(cls, options)
    model = _tiny_llama()
    q.quantize_model(model, ["lm_head"])
    for p in model.parameters():
        p.requires_grad_(False)
    lora: Any = create_registry(load_entrypoints=False).create("adapter", "lora", {"r": 4, "alpha": 8, "dropout": 0.0})
    peft_model = lora.attach(model, AdapterContext(task="causal_lm", quantized=True))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), f"unexpected trainable parameters: {trainable}"
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if p.requires_grad), "adapters must be fp32"
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    embeds = peft_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = peft_model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0, "no input gradient"
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt.step()
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "an optimizer step changed no adapter weight"
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
        peft_model.eval()
        unmerged = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(merged.flatten(), unmerged.flatten(), dim=0)
    assert cos > 0.98, f"merged output cosine similarity {cos:.4f} < 0.98"


def quantizer_checks() -> list[Check]:
    """All conformance checks, for ``pytest.mark.parametrize``."""
    return [check_round_trip, check_dtypes, check_rejects_bad_input, check_quant_linear, check_lora_train_and_merge]


def run_quantizer_checks(cls: type, options: dict | None = None) -> None:
    """Run every check; the first failure raises AssertionError naming the check."""
    for check in quantizer_checks():
        try:
            check(cls, options)
        except AssertionError as exc:
            raise AssertionError(f"{check.__name__}: {exc}") from exc


# --- the testing kit for plugin authors ------------------------------------------------------


def make_registry(plugins: list | None = None, blocked: list | None = None) -> Any:
    """A fresh registry of the builtins plus ``plugins`` (modules or objects with ``@hookimpl``
    functions), never the installed entry points, so a test sees exactly what it names."""
    from qlora_plugins.core.registry import create_registry

    return create_registry(plugins=list(plugins or []), blocked=list(blocked or []), load_entrypoints=False)


def tiny_model_dir(source: str = "tiny-llama") -> Path:
    """The checkpoint directory of a builtin tiny model source (``tiny-llama``, ``tiny-gpt2``,
    ``tiny-bert``), created offline in ``$QLORA_PLUGINS_HOME`` on first use."""
    from qlora_plugins.core.sources import materialize_source

    return materialize_source(make_registry(), source)


def run_cli(*args: Any, registry: Any = None) -> Any:
    """Run the ``qlora`` CLI in-process with click's ``CliRunner`` and return its result
    (``exit_code``, ``stdout``, ``stderr``); ``registry`` (e.g. from :func:`make_registry`)
    replaces the installed plugins."""
    from click.testing import CliRunner

    from qlora_plugins.cli import cli

    if registry is None:
        from qlora_plugins.core.registry import create_registry

        registry = create_registry()
    registry.add_commands(cli)  # plugin commands (qlora plan, qlora bench, a third party's)
    return CliRunner().invoke(cli, [str(a) for a in args], obj={"registry": registry})
