"""The builtin plugins that make up the QLoRA recipe, each through its public plugin interface:
quantizers (nf4, fp4, none) on a tiny model, LoRA, the optimizers, the adapter exporter (loaded
back with peft) and the data formats over every supported file type."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CLASSIFY, CORPUS, INSTRUCTIONS, new_registry

from qlora_plugins import AdapterContext, DataContext, ExportContext, ModelRequest
from qlora_plugins.core.modeling import load_tokenizer
from qlora_plugins.core.training import prepare_for_kbit_training
from qlora_plugins.errors import ConfigError, DataError
from qlora_plugins.modeling import DEFAULT_SKIP_MODULES, auto_class

REGISTRY = new_registry()


def make(kind: str, name: str, **options):
    return REGISTRY.create(kind, name, options, {"data_format": "data"}.get(kind, kind))


def request_for(model_dir, task: str = "causal_lm") -> ModelRequest:
    return ModelRequest(
        path=model_dir,
        task=task,
        auto_class=auto_class(task),
        dtype=torch.float32,
        model_kwargs={"num_labels": 2} if task == "seq_cls" else {},
        skip_modules=list(DEFAULT_SKIP_MODULES),
    )


def full_precision(model_dir, task: str = "causal_lm"):
    return request_for(model_dir, task).load_full_precision().eval()


def linear_weights(model) -> dict:
    """Full-precision weights of the quantizable linears (all but the output heads)."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] not in DEFAULT_SKIP_MODULES
    }


def effective_weight(layer, in_features: int) -> torch.Tensor:
    """The weight a linear-like layer applies, whatever its storage: its output on the identity."""
    with torch.no_grad():
        out = layer(torch.eye(in_features))
        if getattr(layer, "bias", None) is not None:
            out = out - layer.bias
    return out.t()


def sample_ids(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 200, (n, length), generator=g)


# --- quantizers ------------------------------------------------------------------------------


def expected_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Storage of one blockwise 4-bit weight: packed codes (two a byte) plus one absmax a block,
    fp32; with double quantization the absmax are 8-bit codes plus one fp32 scale per 256 of them
    and one fp32 offset."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.mark.parametrize(
    "name, double_quant, backend",
    [
        ("nf4", False, "default"),
        ("nf4", True, "default"),
        ("fp4", False, "default"),
        ("fp4", True, "default"),
        ("nf4", False, "bitsandbytes"),
        ("nf4", True, "bitsandbytes"),
        ("fp4", True, "bitsandbytes"),
    ],
    ids=lambda v: {False: "plain", True: "dq"}.get(v, v) if isinstance(v, bool) else v,
)
@pytest.mark.slow
def test_4bit_quantizers_on_tiny_llama(name, double_quant, backend, tiny_llama_dir):
    fp_model = full_precision(tiny_llama_dir)
    weights = linear_weights(fp_model)
    assert len(weights) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    options = {"double_quant": double_quant}
    options_cls = REGISTRY.get("quantizer", name).Options
    if backend == "bitsandbytes":
        if "backend" not in {f.name for f in __import__("attrs").fields(options_cls)}:
            pytest.skip("this nf4/fp4 has no bitsandbytes backend option")
        options["backend"] = "bitsandbytes"
    quantizer = make("quantizer", name, **options)
    model = quantizer.load_model(request_for(tiny_llama_dir)).eval()

    # before any forward: bitsandbytes repacks its CPU weights on the first one
    footprint = quantizer.footprint(model)
    params = sum(w.numel() for w in weights.values())
    nbytes = sum(expected_bytes(w.numel(), 64, double_quant) for w in weights.values())
    assert footprint.quantized_params == params
    assert footprint.quantized_bytes == nbytes
    assert footprint.bits_per_param == pytest.approx(8 * nbytes / params, rel=1e-12)
    if double_quant:
        # 4 + 8/64 + 32/(64*256) = 4.1270 in the limit; this model's 16k-param layers add 64 bits each
        assert footprint.bits_per_param == pytest.approx(4.127, abs=0.002)
    else:
        assert footprint.bits_per_param == 4.5

    modules = dict(model.named_modules())
    for layer_name, weight in weights.items():
        layer = modules[layer_name]
        assert type(layer) is not torch.nn.Linear, layer_name
        if backend == "bitsandbytes":
            import bitsandbytes as bnb

            assert isinstance(layer, bnb.nn.Linear4bit)
        # blockwise absmax 4-bit: every weight within the largest half-gap of the code (fp4's
        # 1/6, nf4's 0.152) times its block's absmax, plus slack for the 8-bit absmax under DQ
        w_q = effective_weight(layer, weight.shape[1])
        blocks = weight.reshape(-1, 64)
        err = (w_q.reshape(-1, 64) - blocks).abs()
        assert (err <= 0.2 * blocks.abs().amax(dim=1, keepdim=True) + 1e-6).all(), layer_name
        assert 0 < err.mean() < 0.25 * blocks.abs().mean()
    # the output head and embeddings stay in full precision
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(model.lm_head.weight, fp_model.lm_head.weight)
    assert torch.equal(model.get_input_embeddings().weight, fp_model.get_input_embeddings().weight)
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]

    meta = quantizer.metadata()
    assert meta["format"] == name and meta["blocksize"] == 64 and meta["double_quant"] is double_quant

    ids = sample_ids()
    with torch.no_grad():
        ref, out = fp_model(ids).logits, model(ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95


@pytest.mark.slow
def test_blocksize_option_changes_the_storage(tiny_llama_dir):
    weights = linear_weights(full_precision(tiny_llama_dir))
    quantizer = make("quantizer", "nf4", blocksize=256, double_quant=False)
    footprint = quantizer.footprint(quantizer.load_model(request_for(tiny_llama_dir)))
    assert footprint.quantized_bytes == sum(expected_bytes(w.numel(), 256, False) for w in weights.values())
    assert footprint.bits_per_param == 4 + 32 / 256


def test_skip_modules_option_keeps_layers_in_full_precision(tiny_llama_dir):
    quantizer = make("quantizer", "nf4", skip_modules=["down_proj"])
    model = quantizer.load_model(request_for(tiny_llama_dir))
    for name, module in model.named_modules():
        if name.endswith(("down_proj", "lm_head")):
            assert type(module) is torch.nn.Linear, name
        elif name.endswith("q_proj"):
            assert type(module) is not torch.nn.Linear, name


def test_none_quantizer_keeps_the_model(tiny_llama_dir):
    fp_model = full_precision(tiny_llama_dir)
    quantizer = make("quantizer", "none")
    model = quantizer.load_model(request_for(tiny_llama_dir)).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fp_model.state_dict().values()))
    footprint = quantizer.footprint(model)
    assert footprint.quantized_params == 0 and footprint.bits_per_param is None
    assert quantizer.metadata()["format"] == "none"


def test_encoder_classifier_head_is_kept(tiny_bert_dir):
    quantizer = make("quantizer", "nf4")
    model = quantizer.load_model(request_for(tiny_bert_dir, "seq_cls"))
    assert type(model.classifier) is torch.nn.Linear
    assert type(model.bert.encoder.layer[0].attention.self.query) is not torch.nn.Linear
    assert quantizer.footprint(model).quantized_params > 0


# --- LoRA ------------------------------------------------------------------------------------


def quantized_with_lora(model_dir, task="causal_lm", quantizer="nf4", **lora_options):
    q = make("quantizer", quantizer)
    model = q.load_model(request_for(model_dir, task))
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    adapter = make("adapter", "lora", **lora_options)
    footprint = q.footprint(model)
    model = adapter.attach(model, AdapterContext(task=task, quantized=footprint.quantized_params > 0))
    return q, adapter, model


@pytest.mark.slow
def test_lora_on_all_linear_layers_is_the_only_trainable_part(tiny_llama_dir):
    weights = linear_weights(full_precision(tiny_llama_dir))
    _, adapter, model = quantized_with_lora(tiny_llama_dir)
    assert (adapter.options.r, adapter.options.alpha, adapter.options.dropout) == (16, 32, 0.05)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    r = 16
    assert sum(p.numel() for p in trainable.values()) == sum(r * (w.shape[0] + w.shape[1]) for w in weights.values())
    # gradients reach only the adapters
    ids = sample_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def test_lora_target_modules_list_and_options(tiny_llama_dir):
    _, _, model = quantized_with_lora(tiny_llama_dir, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * 2 * 2  # 4 layers x (q, v) x (A, B)
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (4 * (128 + 128) + 4 * (128 + 64))


def test_lora_target_that_matches_nothing_is_a_config_error(tiny_llama_dir):
    with pytest.raises(ConfigError) as exc:
        quantized_with_lora(tiny_llama_dir, target_modules=["nonexistent"])
    assert str(exc.value).startswith("adapter.target_modules: ")


def test_lora_on_an_encoder_trains_adapters_and_the_new_head(tiny_bert_dir):
    _, _, model = quantized_with_lora(tiny_bert_dir, task="seq_cls", r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    assert any("classifier" in n for n in trainable)  # peft's SEQ_CLS saves the fresh head
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# --- optimizers ------------------------------------------------------------------------------


def run_steps(optimizer_name: str, steps: int = 3, **options) -> torch.Tensor:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: big enough for 8-bit states
    plugin = make("optimizer", optimizer_name, **options)
    opt = plugin.create([param], torch.device("cpu"))
    assert isinstance(opt, torch.optim.Optimizer)
    for _ in range(steps):
        loss = ((param - 1.0) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return param.detach()


@pytest.mark.parametrize("name", ["adamw", "paged_adamw", "adamw_8bit"])
def test_optimizers_create_and_step(name):
    torch.manual_seed(0)
    start = torch.randn(64, 64)
    after = run_steps(name, lr=1e-2)
    assert not torch.equal(after, start)
    assert ((after - 1.0) ** 2).mean() < ((start - 1.0) ** 2).mean()


def test_paged_adamw_updates_like_adamw_on_cpu():
    options = {"lr": 1e-2, "weight_decay": 0.01, "betas": [0.8, 0.99], "eps": 1e-6}
    assert torch.allclose(run_steps("paged_adamw", **options), run_steps("adamw", **options), atol=1e-6)


def test_paged_adamw_says_what_it_does_without_cuda():
    plugin = make("optimizer", "paged_adamw")
    note = plugin.runtime_note(torch.device("cpu"))
    assert note and "CUDA" in note and "paged_adamw" in note
    assert plugin.runtime_note(torch.device("cuda")) is None
    assert make("optimizer", "adamw").runtime_note(torch.device("cpu")) is None


def test_optimizer_options_reach_the_torch_optimizer():
    opt = make("optimizer", "adamw", lr=0.5, weight_decay=0.1, betas=[0.5, 0.6], eps=0.01).create(
        [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu")
    )
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.5, 0.1, (0.5, 0.6), 0.01)


# --- adapter exporter ------------------------------------------------------------------------


def train_a_little(model, steps: int = 4) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    ids = sample_ids(4, 32, seed=1)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def export_adapter(model, quantizer, adapter, model_dir, tmp_path, tokenizer):
    exporter = make("exporter", "adapter")
    context = ExportContext(model, tokenizer, model_dir, "causal_lm", quantizer, adapter, {}, request_for(model_dir))
    out = tmp_path / "export"
    out.mkdir()
    info = exporter.export(context, out)
    assert info["format"] == "peft-adapter"
    return out


@pytest.mark.parametrize("quantizer_name", ["none", "nf4"])
@pytest.mark.slow
def test_adapter_export_loads_with_peft_and_gives_the_trained_logits(quantizer_name, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    quantizer, adapter, model = quantized_with_lora(tiny_llama_dir, quantizer=quantizer_name, r=8, dropout=0.0)
    ids = sample_ids(seed=2)
    with torch.no_grad():
        before = model(ids).logits
    train_a_little(model)
    with torch.no_grad():
        trained = model(ids).logits
    assert not torch.allclose(before, trained, atol=1e-3)  # training moved the adapter

    out = export_adapter(model, quantizer, adapter, tiny_llama_dir, tmp_path, load_tokenizer(tiny_llama_dir))
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)

    base = full_precision(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        from_fp_base = loaded(ids).logits
    if quantizer_name == "none":
        assert torch.allclose(from_fp_base, trained, atol=1e-5)
    else:
        # the trained model saw the 4-bit base; on the full-precision base the logits stay close
        assert torch.nn.functional.cosine_similarity(from_fp_base.flatten(), trained.flatten(), dim=0) > 0.95
        # and on the same 4-bit base (quantization is deterministic), through the adapter plugin, exactly
        requantized = quantizer.load_model(request_for(tiny_llama_dir))
        reloaded = adapter.load(requantized, out, AdapterContext(task="causal_lm", quantized=True)).eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(ids).logits, trained, atol=1e-5)


# --- data formats ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert_dir):
    return load_tokenizer(tiny_bert_dir)


def load_data(fmt: str, tokenizer, task="causal_lm", seed=0, base_dir=None, **options):
    plugin = make("data_format", fmt, **options)
    return plugin.load(DataContext(tokenizer, task, seed, base_dir or INSTRUCTIONS.parent, "data"))


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_files(rows: list[dict], tmp_path, stem: str) -> dict:
    """The same rows as jsonl, json (an array), csv and parquet."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    paths["jsonl"] = tmp_path / f"{stem}.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"] = tmp_path / f"{stem}.json"
    paths["json"].write_text(json.dumps(rows))
    paths["csv"] = tmp_path / f"{stem}.csv"
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["parquet"] = tmp_path / f"{stem}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def test_instruction_masks_the_prompt(llama_tokenizer):
    tok = llama_tokenizer
    rows = rows_of(INSTRUCTIONS)
    splits = load_data("instruction", tok, path=INSTRUCTIONS.name, max_length=64, eval_fraction=0.1)
    examples = splits.train + splits.eval
    assert len(examples) == len(rows) == 40
    assert (len(splits.train), len(splits.eval)) == (36, 4)
    assert splits.num_labels is None
    answers = sorted(r["output"] for r in rows)
    decoded = []
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) <= 64
        n_prompt = labels.index(next(x for x in labels if x != -100))
        assert n_prompt > 0 and all(x == -100 for x in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        prompt = tok.decode(ids[1:n_prompt])
        assert prompt.startswith("### Instruction:\n") and prompt.endswith("### Response:\n")
        decoded.append(tok.decode(ids[n_prompt:-1]))
        if "Reverse." in prompt:
            assert "### Input:\n" in prompt
    assert sorted(decoded) == answers


def test_instruction_split_is_seeded(llama_tokenizer):
    a = load_data("instruction", llama_tokenizer, seed=0, path=INSTRUCTIONS.name, max_length=64)
    b = load_data("instruction", llama_tokenizer, seed=0, path=INSTRUCTIONS.name, max_length=64)
    c = load_data("instruction", llama_tokenizer, seed=1, path=INSTRUCTIONS.name, max_length=64)
    assert a.eval == b.eval and a.train == b.train
    assert a.eval != c.eval
    none = load_data("instruction", llama_tokenizer, path=INSTRUCTIONS.name, max_length=64, eval_fraction=0.0, max_examples=10)
    assert len(none.train) == 10 and none.eval == []


def test_instruction_truncates_and_drops_rows_without_a_response(llama_tokenizer):
    full = load_data("instruction", llama_tokenizer, path=INSTRUCTIONS.name, max_length=64, eval_fraction=0.0)
    short = load_data("instruction", llama_tokenizer, path=INSTRUCTIONS.name, max_length=52, eval_fraction=0.0)
    assert all(len(ex["input_ids"]) <= 52 for ex in short.train)
    assert all(any(x != -100 for x in ex["labels"]) for ex in short.train)
    assert 0 < len(short.train) < len(full.train)  # the "Reverse." prompts (with input) are longer
    with pytest.raises(DataError, match=r"^data\.max_length: every prompt in instructions\.jsonl is at least 16 tokens"):
        load_data("instruction", llama_tokenizer, path=INSTRUCTIONS.name, max_length=16)


@pytest.mark.parametrize("ext", ["json", "csv", "parquet"])
def test_instruction_reads_every_file_type_alike(ext, llama_tokenizer, tmp_path):
    paths = as_files(rows_of(INSTRUCTIONS), tmp_path, "rows")
    reference = load_data("instruction", llama_tokenizer, base_dir=tmp_path, path="rows.jsonl", max_length=64)
    other = load_data("instruction", llama_tokenizer, base_dir=tmp_path, path=paths[ext].name, max_length=64)
    assert other.train == reference.train and other.eval == reference.eval


def test_instruction_custom_columns_and_template(llama_tokenizer, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(5)))
    splits = load_data(
        "instruction",
        llama_tokenizer,
        base_dir=tmp_path,
        path=str(path),
        instruction_column="q",
        output_column="a",
        template="Q: {instruction}\nA: ",
        eval_fraction=0.0,
    )
    ex = splits.train[0]
    n_prompt = sum(1 for x in ex["labels"] if x == -100)
    assert llama_tokenizer.decode(ex["input_ids"][1:n_prompt]).startswith("Q: q")


def test_text_is_cut_into_blocks(llama_tokenizer, tmp_path):
    lines = CORPUS.read_text().splitlines()
    n_tokens = len(llama_tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"])
    splits = load_data("text", llama_tokenizer, path=CORPUS.name, max_length=64, eval_fraction=0.25)
    blocks = splits.train + splits.eval
    assert len(blocks) == n_tokens // 64
    assert len(splits.eval) == round(len(blocks) * 0.25)
    assert all(len(b["input_ids"]) == 64 and b["labels"] == b["input_ids"] for b in blocks)
    # the same text from a parquet/jsonl column
    paths = as_files([{"body": line} for line in lines], tmp_path, "corpus")
    for ext in ("jsonl", "parquet", "csv"):
        again = load_data(
            "text", llama_tokenizer, base_dir=tmp_path, path=paths[ext].name, text_column="body", max_length=64, eval_fraction=0.25
        )
        assert again.train == splits.train, ext


def test_text_shorter_than_a_block(llama_tokenizer, tmp_path):
    (tmp_path / "tiny.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"tiny\.txt has 5 tokens, fewer than one block of max_length=64"):
        load_data("text", llama_tokenizer, base_dir=tmp_path, path="tiny.txt", max_length=64)


def test_classification_maps_string_labels(bert_tokenizer, tmp_path):
    splits = load_data("classification", bert_tokenizer, task="seq_cls", path=CLASSIFY.name, max_length=64, eval_fraction=0.25)
    assert splits.num_labels == 2
    examples = splits.train + splits.eval
    assert len(examples) == 24 and len(splits.eval) == 6
    by_text = {bert_tokenizer.decode(e["input_ids"], skip_special_tokens=True): e["labels"] for e in examples}
    assert by_text["good fun"] == 1 and by_text["bad day"] == 0  # sorted names: negative=0, positive=1
    for e in examples:
        assert e["input_ids"][0] == bert_tokenizer.cls_token_id and e["input_ids"][-1] == bert_tokenizer.sep_token_id
    # parquet, jsonl with integer labels: num_labels = max + 1
    rows = [{"sentence": f"text {i}", "target": i % 3} for i in range(9)]
    paths = as_files(rows, tmp_path, "ints")
    for ext in ("jsonl", "parquet"):
        ints = load_data(
            "classification",
            bert_tokenizer,
            task="seq_cls",
            base_dir=tmp_path,
            path=paths[ext].name,
            text_column="sentence",
            label_column="target",
            eval_fraction=0.0,
        )
        assert ints.num_labels == 3 and sorted(e["labels"] for e in ints.train) == sorted(r["target"] for r in rows)
    long = load_data("classification", bert_tokenizer, task="seq_cls", path=CLASSIFY.name, max_length=8)
    assert all(len(e["input_ids"]) <= 8 for e in long.train)


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("cols.jsonl", '{"question": "q", "answer": "a"}\n', "cols.jsonl lacks column(s) instruction, output; it has: question, answer"),
        ("empty.jsonl", "", "empty.jsonl is empty"),
        ("header.csv", "instruction,output\n", "header.csv has no rows"),
        ("blank.jsonl", "\n\n", "blank.jsonl has no rows"),
        ("array.json", "[]", "array.json has no rows"),
        ("bad.jsonl", '{"instruction": "x", "output": \n', "cannot parse"),
        ("data.xlsx", "x", "data.xlsx: unsupported file type '.xlsx'"),
        ("latin1.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n', "is not UTF-8 text"),
    ],
)
def test_instruction_bad_files(name, content, fragment, llama_tokenizer, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as exc:
        load_data("instruction", llama_tokenizer, base_dir=tmp_path, path=name)
    assert str(exc.value).startswith("data.path: ") and fragment in str(exc.value)


def test_missing_data_file_is_caught_by_the_cheap_check(tmp_path):
    plugin = make("data_format", "instruction", path="nope.jsonl")
    with pytest.raises(DataError, match=r"^data\.path: data file not found: .*nope\.jsonl"):
        plugin.check(tmp_path, "data")
    with pytest.raises(DataError, match=r"^data\.path: not a file"):
        make("data_format", "text", path=".").check(tmp_path, "data")
    make("data_format", "instruction", path=str(INSTRUCTIONS)).check(tmp_path, "data")  # absolute paths pass


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "has a single label class"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": -1}], "integer labels must be >= 0"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": None}], "rows without a label"),
        ([{"text": "a"}], "lacks column(s) label"),
    ],
)
def test_classification_bad_labels(rows, fragment, bert_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_data("classification", bert_tokenizer, task="seq_cls", base_dir=tmp_path, path="c.jsonl")


def test_empty_parquet_has_no_rows(llama_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"^data\.path: .*e\.parquet has no rows$"):
        load_data("instruction", llama_tokenizer, base_dir=tmp_path, path="e.parquet")
