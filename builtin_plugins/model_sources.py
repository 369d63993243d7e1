"""Builtin model sources: tiny models created deterministically (seeded random init from a config)
with a byte-level tokenizer, so the quickstart and the tests run offline on any machine.

``tiny-llama`` is the quickstart's default (Llama architecture, ~1.6M parameters);
``tiny-gpt2`` and ``tiny-bert`` (sequence classification) show the tool is architecture-agnostic.
``tiny-llama-chat`` is ``tiny-llama`` with a chat template (ChatML, its turn markers added to the
tokenizer as special tokens, ``<|im_end|>`` as EOS) for ``examples/chat.yaml``; it is a source of
its own because two more tokens change the vocabulary, and so the quickstart's model and figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_plugins import ModelSource, hookimpl
from qlora_plugins.builtin_plugins.chat_templates import CHATML, MARKERS

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_level_tokenizer(bert_style: bool = False) -> Any:
    """A deterministic byte-level tokenizer: the 256 bytes plus special tokens, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] if bert_style else SPECIAL_TOKENS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[3]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _save(model_cls: Any, config: Any, tokenizer: Any, directory: Path) -> None:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def chat_tokenizer() -> Any:
    """The byte-level tokenizer with ChatML's turn markers as special tokens, ``<|im_end|>`` as
    EOS and the builtin ChatML template as its chat template."""
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS["chatml"])})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML.source
    return tok


def _tiny_llama_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


class TinyLlama(ModelSource):
    """A tiny Llama (hidden 128, 4 layers, byte tokenizer), random init with seed 0."""

    name = "tiny-llama"
    version = "1"

    def materialize(self, directory: Path) -> None:
        from transformers import LlamaForCausalLM

        tok = byte_level_tokenizer()
        _save(LlamaForCausalLM, _tiny_llama_config(tok), tok, directory)


class TinyLlamaChat(ModelSource):
    """tiny-llama with a ChatML chat template (special turn tokens), random init with seed 0."""

    name = "tiny-llama-chat"
    version = "1"

    def materialize(self, directory: Path) -> None:
        from transformers import LlamaForCausalLM

        tok = chat_tokenizer()
        _save(LlamaForCausalLM, _tiny_llama_config(tok), tok, directory)


class TinyGPT2(ModelSource):
    """A tiny GPT-2 (hidden 64, 2 layers, byte tokenizer), random init with seed 0."""

    name = "tiny-gpt2"
    version = "1"

    def materialize(self, directory: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = byte_level_tokenizer()
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        _save(GPT2LMHeadModel, config, tok, directory)


class TinyBert(ModelSource):
    """A tiny BERT encoder for sequence classification (hidden 64, 2 layers), seed 0."""

    name = "tiny-bert"
    version = "1"
    task = "seq_cls"

    def materialize(self, directory: Path) -> None:
        from transformers import BertConfig, BertForSequenceClassification

        tok = byte_level_tokenizer(bert_style=True)
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
        )
        _save(BertForSequenceClassification, config, tok, directory)


@hookimpl
def register_model_sources(register):
    register(TinyLlama)
    register(TinyLlamaChat)
    register(TinyGPT2)
    register(TinyBert)
