"""Shared fixtures: tiny random-config models of every mapped architecture, and the real data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub during tests

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModel,
    DistilBertConfig,
    GPT2Config,
    PreTrainedTokenizerFast,
)

# Tiny models gain nothing from threads; on a shared machine extra threads only contend.
torch.set_num_threads(1)

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

PAD_ID, CLS_ID, SEP_ID = 0, 2, 3  # [PAD], [CLS], [SEP] in the tiny vocabulary
# The common tiny shape: hidden 32, 2 blocks of 2 heads, FFN 48, special ids in the vocabulary.
TINY = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 160,
    "pad_token_id": PAD_ID,
    "bos_token_id": CLS_ID,
    "eos_token_id": SEP_ID,
}
# Decoders: one key/value head (grouped-query attention) and a small head_dim where the family's
# default (128-256) would dwarf the model.
DECODER = {**TINY, "num_key_value_heads": 1, "head_dim": 16}
# Gemma 2/3 alternate sliding-window and global layers; a window of 4 is shorter than the
# test sentences, so the sliding path really runs.
SLIDING = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}


def _tiny(model_type: str, **overrides):
    return lambda: AutoConfig.for_model(model_type, **{**TINY, **overrides})


# Small enough to run in milliseconds, with every structural feature of the real family.
TINY_CONFIGS = {
    "bert": _tiny("bert", pad_token_id=PAD_ID),
    "roberta": _tiny("roberta", max_position_embeddings=162),
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
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
    ),
    "llama": _tiny("llama", num_key_value_heads=1),
    # The families added for issue 11, each in its real layout.
    "xlm-roberta": _tiny("xlm-roberta", max_position_embeddings=162),
    # An embedding narrower than the blocks: ELECTRA's embeddings_project runs.
    "electra": _tiny("electra", embedding_size=16),
    # ALBERT: one shared layer applied twice, factorised 16-wide embeddings.
    "albert": _tiny("albert", embedding_size=16),
    # DeBERTa-v3's layout: relative attention only (no absolute positions), log buckets,
    # shared attention keys, no token types.
    "deberta-v2": _tiny(
        "deberta-v2",
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        position_buckets=8,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
    ),
    "mpnet": _tiny("mpnet", max_position_embeddings=162),
    # Block 0 global, block 1 local (window 4): both attention paths run.
    "modernbert": _tiny(
        "modernbert",
        cls_token_id=CLS_ID,
        sep_token_id=SEP_ID,
        global_attn_every_n_layers=2,
        local_attention=4,
        # Its default init (0.02, scaled down with depth) leaves the blocks' branches so small
        # next to the residual that no trained change would show in the logits.
        initializer_range=0.2,
    ),
    "gpt_neox": _tiny("gpt_neox"),
    "opt": _tiny("opt", ffn_dim=48, word_embed_proj_dim=32),
    "mistral": _tiny("mistral", **DECODER, sliding_window=None),
    # transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer (byte-level BPE), which
    # keeps only the special tokens of the tiny word vocabulary: its tests see [CLS] ... [SEP].
    "qwen2": _tiny("qwen2", **DECODER),
    "qwen3": _tiny("qwen3", **DECODER),
    "gemma": _tiny("gemma", **DECODER),
    "gemma2": _tiny("gemma2", **DECODER, **SLIDING),
    "gemma3_text": _tiny("gemma3_text", **DECODER, **SLIDING),
    "phi3": _tiny("phi3", **DECODER),
}
# Every mapped family: the method x architecture matrix and the map tests run on all of them.
FAMILY_TYPES = tuple(TINY_CONFIGS)
# A representative subset (post-LN encoders with and without a pooler, pre-LN decoders with and
# without biases) for the deeper per-method tests, which would not learn more from all families.
ARCH_TYPES = ("bert", "roberta", "distilbert", "gpt2", "llama")


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


def decoder_tokenizer(eos_appended: bool = False) -> PreTrainedTokenizerFast:
    """The tiny vocabulary as decoders ship their tokenizers: no pad token (`load_backbone`
    pads with EOS, [SEP] here) and no [CLS]; EOS appended to every text only if asked."""
    tokenizer = tiny_tokenizer()
    template = "$A [SEP]" if eos_appended else "$A"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, pair=f"{template} $B:1", special_tokens=[("[SEP]", SEP_ID)]
    )
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def make_tiny_model(
    model_type: str, folder: Path, seed: int = 0, config=None, tokenizer=None
) -> Path:
    """Save a random tiny model of `model_type` (or of `config`) with the tiny tokenizer (or
    `tokenizer`); returns the folder."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(config or TINY_CONFIGS[model_type]())
    # Random LayerNorm/bias values, so that folding into them is really exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


class _TinyModelDirs(dict):
    """model type -> folder, each model built and saved on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, model_type: str) -> Path:
        folder = self[model_type] = make_tiny_model(model_type, self.root / model_type)
        return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    return _TinyModelDirs(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "glue" / "sst2" / "validation.jsonl").is_file():
        pytest.fail(f"benchmark data not found at {DATA_DIR}; set MICROTUNE_DATA_DIR")
    return DATA_DIR


def error_lines(err: str) -> list[str]:
    """stderr's lines without the status lines a command shows while it loads ("microtune:
    loading base model …", `eval` and `predict`): a refusal is then one line."""
    return [line for line in err.strip().splitlines() if not line.startswith(STATUS_LINE)]


STATUS_LINE = "microtune: loading "


def tiny_batch(tokenizer, pair: bool = False):
    texts = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]
    seconds = ["it was great", "bad", "the story is fun and good", "hate"] if pair else None
    return tokenizer(texts, seconds, padding=True, return_tensors="pt")


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> Path:
    """A small sentiment task in the tiny vocabulary: 'good/great/fun/best/love' is positive."""
    rng = random.Random(0)
    positive = {"good", "great", "fun", "best", "love"}
    folder = tmp_path_factory.mktemp("toy")
    for split, size in (("train", 96), ("dev", 32)):
        rows = []
        for _ in range(size):
            words = rng.sample(WORDS, 5)
            rows.append({"sentence": " ".join(words), "label": int(bool(positive & set(words)))})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
