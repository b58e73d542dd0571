"""Where things live inside each supported `transformers` architecture.

`ARCHITECTURES` declares one `ArchSpec` per `model_type`; families that share a layout share
one spec (Llama, Mistral, Qwen2 and Qwen3 differ only in their bias flags). Paths are dotted
attribute paths: `blocks` and `embeddings` from the backbone (what `AutoModel` returns), the
per-block paths from one block. Every entry was read off the `transformers` source and is
checked by the method x architecture matrix on a tiny random config (`tests/conftest.py`).

A model type that is not declared is mapped by structure (`backbone.discovery`) when that is
unambiguous; `arch_for` refuses it otherwise. To declare a new family, add an `ArchSpec` here
and a tiny config in `tests/conftest.py`.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import replace
from typing import Any

from torch import nn

from microtune.backbone.archspec import (
    ArchSpec,
    UnsupportedModelError,
    ensure_bias,
    get_submodule,
    input_dim,
    is_conv1d,
    output_dim,
)
from microtune.backbone.discovery import discover_arch

# BERT and the encoders that kept its layout: post-LN, a LayerNorm after each residual add.
_BERT = ArchSpec(
    blocks="encoder.layer",
    attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embeddings="embeddings.word_embeddings",
    attention=("attention.self.query", "attention.self.key", "attention.self.value"),
    pooler="pooler",
    token_type_ids=True,
    seq_cls_classifier="classifier",
)
# RoBERTa's (and XLM-R's) classification head reads <s> through its own dense+tanh, not the
# pooler, so the pooler read-out has no `AutoModelForSequenceClassification` equivalent.
_ROBERTA = replace(_BERT, seq_cls_classifier=None)

# Pre-LN decoders with SwiGLU: act(gate(x)) * up(x); the gate is the linear whose output enters
# the activation. Whether a linear has a bias is a config flag in some families, fixed in
# others: Mistral has none anywhere, Qwen2 has fixed q/k/v biases but none on o_proj or the FFN,
# Qwen3 and Gemma switch attention biases with `attention_bias` and have no FFN biases at all.
_LLAMA = ArchSpec(
    blocks="layers",
    attn_out="self_attn.o_proj",
    attn_norm=None,
    ffn_in="mlp.gate_proj",
    ffn_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    embeddings="embed_tokens",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    pre_norm=True,
    causal=True,
    bias_flags={"ffn_in": "mlp_bias", "ffn_out": "mlp_bias", "attn_out": "attention_bias"},
)
_ATTENTION_BIAS_ONLY = {"attn_out": "attention_bias"}
# Gemma's RMSNorm scales by (1 + weight), which no method here relies on: norms are read for
# their width only. Its embedding layer multiplies by sqrt(hidden size) itself, so prompts
# initialised from what enters block 0 (WARP) carry the scale.
_GEMMA = replace(_LLAMA, bias_flags=_ATTENTION_BIAS_ONLY)
# Gemma 2 and 3 add a norm on each sub-layer's output before the residual add ("sandwich"):
# still pre-LN in the sense used here (no norm after the residual add), so attn_norm is None.
_GEMMA2 = replace(
    _GEMMA,
    norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    # No pooler; when embedding_size != hidden_size an `embeddings_project` linear sits between
    # the embeddings and block 0 (prompts are written after it, at block 0's input).
    "electra": replace(_ROBERTA, pooler=None),
    # DeBERTa-v2/v3: BERT's block with disentangled relative attention (its relative embeddings
    # live on the encoder, outside the blocks); no pooler in the backbone (the classification
    # model's ContextPooler is its own), and v3 checkpoints have type_vocab_size 0.
    "deberta-v2": replace(
        _ROBERTA,
        attention=(
            "attention.self.query_proj",
            "attention.self.key_proj",
            "attention.self.value_proj",
        ),
        pooler=None,
        token_type_ids=False,
    ),
    # MPNet keeps its output projection inside the attention module (`attention.attn.o`) and
    # its LayerNorm one level up; its classification head is RoBERTa-style, not the pooler.
    "mpnet": ArchSpec(
        blocks="encoder.layer",
        attn_out="attention.attn.o",
        attn_norm="attention.LayerNorm",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        norms=("attention.LayerNorm", "output.LayerNorm"),
        embeddings="embeddings.word_embeddings",
        attention=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        pooler="pooler",
    ),
    "distilbert": ArchSpec(
        blocks="transformer.layer",
        attn_out="attention.out_lin",
        attn_norm="sa_layer_norm",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        norms=("sa_layer_norm", "output_layer_norm"),
        embeddings="embeddings.word_embeddings",
        attention=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    ),
    # ALBERT applies ONE shared layer num_hidden_layers times. Its blocks here are the distinct
    # layer modules (one for every released checkpoint), so everything a method attaches to a
    # block acts per module: identically at each of the L applications. A per-layer shift
    # (SLaSh) is therefore one shift per shared layer, added at every application and folded
    # exactly into the shared bias (a shift differing per application could not fold into that
    # one bias, so it is not offered); LoRA and adapters are shared across depth like the
    # weights. Prompt methods write the prompt at block 0's input, i.e. before EVERY
    # application: on ALBERT, WARP's prompt is re-inserted at each layer (a deep prompt shared
    # across depth). The pooler is a bare Linear fed [CLS] alone, which the prompt hooks cannot
    # handle, so it is not mapped (no pooler read-out).
    "albert": ArchSpec(
        blocks="encoder.albert_layer_groups.0.albert_layers",
        attn_out="attention.dense",
        attn_norm="attention.LayerNorm",
        ffn_in="ffn",
        ffn_out="ffn_output",
        norms=("attention.LayerNorm", "full_layer_layer_norm"),
        embeddings="embeddings.word_embeddings",
        attention=("attention.query", "attention.key", "attention.value"),
        token_type_ids=True,
        config_assumes={"num_hidden_groups": 1},
    ),
    # ModernBERT: pre-LN, fused q/k/v (Wqkv) and fused input+gate (Wi, 2F wide), no biases by
    # default (`mlp_bias`, `attention_bias`; `norm_bias` for the LayerNorms). Block 0's
    # attn_norm is an Identity (the embeddings end in a norm), so only mlp_norm is a norm in
    # every block. Its `pooler` is not in the backbone (ModernBertForSequenceClassification's).
    "modernbert": ArchSpec(
        blocks="layers",
        attn_out="attn.Wo",
        attn_norm=None,
        ffn_in="mlp.Wi",
        ffn_out="mlp.Wo",
        norms=("mlp_norm",),
        embeddings="embeddings.tok_embeddings",
        attention=("attn.Wqkv", "attn.Wqkv", "attn.Wqkv"),
        pre_norm=True,
        bias_flags={"ffn_in": "mlp_bias", "ffn_out": "mlp_bias", "attn_out": "attention_bias"},
    ),
    "gpt2": ArchSpec(
        blocks="h",
        attn_out="attn.c_proj",
        attn_norm=None,
        ffn_in="mlp.c_fc",
        ffn_out="mlp.c_proj",
        norms=("ln_1", "ln_2"),
        embeddings="wte",
        # GPT-2 fuses q, k and v into one Conv1D.
        attention=("attn.c_attn", "attn.c_attn", "attn.c_attn"),
        pre_norm=True,
        causal=True,
    ),
    # GPT-NeoX (Pythia): parallel residual x + attn(ln1(x)) + mlp(ln2(x)) by default; each
    # sub-layer's output projection still ends its branch, so shifts fold into their biases.
    "gpt_neox": ArchSpec(
        blocks="layers",
        attn_out="attention.dense",
        attn_norm=None,
        ffn_in="mlp.dense_h_to_4h",
        ffn_out="mlp.dense_4h_to_h",
        norms=("input_layernorm", "post_attention_layernorm"),
        embeddings="embed_in",
        attention=(
            "attention.query_key_value",
            "attention.query_key_value",
            "attention.query_key_value",
        ),
        pre_norm=True,
        causal=True,
        bias_flags=_ATTENTION_BIAS_ONLY,
    ),
    # OPT keeps fc1/fc2 on the block. It is pre-LN except OPT-350m (do_layer_norm_before
    # False); there too the attention position's shift goes on out_proj (before the residual
    # and the LayerNorm), which folds exactly into its bias: attn_norm stays None.
    "opt": ArchSpec(
        blocks="decoder.layers",
        attn_out="self_attn.out_proj",
        attn_norm=None,
        ffn_in="fc1",
        ffn_out="fc2",
        norms=("self_attn_layer_norm", "final_layer_norm"),
        embeddings="decoder.embed_tokens",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        pre_norm=True,
        causal=True,
        bias_flags={"ffn_in": "enable_bias", "ffn_out": "enable_bias", "attn_out": "enable_bias"},
    ),
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, bias_flags={}),
    "qwen2": replace(_LLAMA, bias_flags={}),
    "qwen3": replace(_LLAMA, bias_flags=_ATTENTION_BIAS_ONLY),
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    # `gemma3_text` is Gemma 3 1B (text only). `gemma3` checkpoints (4B and up) build a
    # vision-language model whose config nests the text settings: not declared.
    "gemma3_text": _GEMMA2,
    # Phi-3 fuses q/k/v (qkv_proj) and gate+up (gate_up_proj, 2F wide, gate first); no biases
    # and no flag to add them.
    "phi3": replace(
        _LLAMA,
        ffn_in="mlp.gate_up_proj",
        attention=("self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj"),
        bias_flags={},
    ),
}

# Specs found by structure, per backbone instance (discovery runs a short forward pass).
_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, ArchSpec] = weakref.WeakKeyDictionary()


def arch_for(model_or_type: nn.Module | str) -> ArchSpec:
    """The spec for a model (or a `model_type` string); a one-line error if unsupported.

    A model whose type is not declared is mapped by structure (`backbone.discovery`); a type
    string can only consult the declared map.
    """
    if isinstance(model_or_type, str):
        return _declared(model_or_type)
    model = model_or_type
    model_type = model.config.model_type
    spec = ARCHITECTURES.get(model_type) or _DISCOVERED.get(model)
    if spec is None:
        spec = _DISCOVERED[model] = discover_arch(model)
    for key, expected in spec.config_assumes.items():
        value = getattr(model.config, key, None)
        if value != expected:
            raise UnsupportedModelError(
                f"{model_type} with {key}={value} is not supported: the architecture map "
                f"assumes {key}={expected} (add an ArchSpec in microtune/arch.py)"
            )
    return spec


def _declared(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported types: {supported} "
            "(add an ArchSpec in microtune/arch.py for a new one)"
        ) from None


def describe(backbone: nn.Module) -> dict[str, Any]:
    """The map `arch_for` uses for this backbone, as plain data (`microtune inspect`)."""
    arch = arch_for(backbone)
    ffn_out = arch.block_part(backbone, 0, "ffn_out")
    model_type = backbone.config.model_type
    return {
        "source": "declared" if model_type in ARCHITECTURES else "discovered",
        "model_type": model_type,
        "num_blocks": arch.num_layers(backbone),
        "num_hidden_layers": getattr(backbone.config, "num_hidden_layers", None),
        "hidden_size": output_dim(ffn_out),
        "intermediate_size": input_dim(ffn_out),
        "map": dataclasses.asdict(arch),
    }


# The spec type and its module helpers live in `backbone.archspec`; they are offered here too,
# as the architecture map's vocabulary (methods read both).
__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "UnsupportedModelError",
    "arch_for",
    "describe",
    "ensure_bias",
    "get_submodule",
    "input_dim",
    "is_conv1d",
    "output_dim",
]
