"""Shared fixtures: tiny random-config models of every mapped architecture, and the real data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub during tests

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MICROTUNE_DATA_DIR", REPO.parent / "shared" / "data"))

WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "is",
    "was",
    "good",
    "bad",
    "great",
    "awful",
    "not",
    "very",
    "fun",
    "dull",
    "plot",
    "actors",
    "story",
    "best",
    "worst",
    "love",
    "hate",
    "it",
    "and",
    "of",
    "to",
    "this",
    "that",
    ",",
    ".",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_SIZE = len(SPECIALS) + len(WORDS)

# Small enough to run in milliseconds, with every structural feature of the real family.
TINY_CONFIGS = {
    "bert": lambda: BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=160,
    ),
    "roberta": lambda: RobertaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=162,
        pad_token_id=0,
    ),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=VOCAB_SIZE,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=48,
        max_position_embeddings=160,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=48,
        n_positions=160,
        bos_token_id=2,
        eos_token_id=3,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=160,
    ),
}
ARCH_TYPES = tuple(TINY_CONFIGS)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with [CLS] a [SEP] b [SEP] templates, built without a download."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def make_tiny_model(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Save a random tiny model of `model_type` with the tiny tokenizer; returns the folder."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(TINY_CONFIGS[model_type]())
    # Random LayerNorm/bias values, so that folding into them is really exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {t: make_tiny_model(t, root / t) for t in ARCH_TYPES}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "glue" / "sst2" / "validation.jsonl").is_file():
        pytest.fail(f"benchmark data not found at {DATA_DIR}; set MICROTUNE_DATA_DIR")
    return DATA_DIR


def tiny_batch(tokenizer, pair: bool = False):
    texts = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]
    seconds = ["it was great", "bad", "the story is fun and good", "hate"] if pair else None
    return tokenizer(texts, seconds, padding=True, return_tensors="pt")
