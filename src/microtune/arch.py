"""Where things live inside each supported `transformers` architecture.

This is the one file to touch to support a new model type: add an `ArchSpec` to `ARCHITECTURES`
and a tiny-config entry to `tests/conftest.py`. Paths are dotted attribute paths; `blocks` is
relative to the backbone (what `AutoModel` returns), the per-block paths are relative to one
block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from microtune.errors import MicrotuneError


class UnsupportedModelError(MicrotuneError):
    """The model type has no entry in the architecture map."""


@dataclass(frozen=True)
class ArchSpec:
    """Locations of the parts of one architecture family.

    Attributes:
        blocks: the ModuleList of transformer blocks, from the backbone.
        attn_out: the attention output projection (before the residual add).
        attn_norm: the LayerNorm applied after the attention residual (post-LN models only).
        ffn_in: the FFN's first linear, whose output goes into the activation.
        ffn_out: the FFN's second linear (down projection), before the residual add.
        norms: every normalisation layer of a block.
        embeddings: the token embedding table, from the backbone.
        pooler: the backbone's pooler module, if the family has one.
        pre_norm: True for pre-LayerNorm blocks (GPT-2, Llama).
        causal: True for decoders (causal attention; read the last token).
        bias_flags: config attributes that switch on the biases of a layer family, for families
            whose linears have none (Llama). A method that creates a bias there sets the flag
            when exporting, so the merged model is still a stock `transformers` model.
        attention: query, key and value projections (default LoRA targets are query and value).
        token_type_ids: the backbone takes segment ids (BERT-style pair encoding).
        seq_cls_classifier: attribute of `AutoModelForSequenceClassification` that holds the
            final linear when that class reads the backbone's pooler (BERT); None where the
            pooler read-out cannot be exported to that class.
    """

    blocks: str
    attn_out: str
    attn_norm: str | None
    ffn_in: str
    ffn_out: str
    norms: tuple[str, ...]
    embeddings: str
    attention: tuple[str, str, str]
    pooler: str | None = None
    pre_norm: bool = False
    causal: bool = False
    bias_flags: dict[str, str] = field(default_factory=dict)
    token_type_ids: bool = False
    seq_cls_classifier: str | None = None

    def blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return get_submodule(backbone, self.blocks)

    def block_part(self, backbone: nn.Module, layer: int, part: str) -> nn.Module:
        """The module named by field `part` (e.g. "ffn_out") inside block `layer`."""
        path = getattr(self, part)
        if path is None:
            raise ValueError(f"this architecture has no {part}")
        return get_submodule(self.blocks_of(backbone)[layer], path)

    def num_layers(self, backbone: nn.Module) -> int:
        return len(self.blocks_of(backbone))


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

ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    # RoBERTa's classification head reads <s> through its own dense+tanh, not the pooler.
    "roberta": ArchSpec(**{**_BERT.__dict__, "seq_cls_classifier": None}),
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
    "llama": ArchSpec(
        blocks="layers",
        attn_out="self_attn.o_proj",
        attn_norm=None,
        # SwiGLU: act(gate(x)) * up(x); the gate is the linear whose output enters the activation.
        ffn_in="mlp.gate_proj",
        ffn_out="mlp.down_proj",
        norms=("input_layernorm", "post_attention_layernorm"),
        embeddings="embed_tokens",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        pre_norm=True,
        causal=True,
        bias_flags={"ffn_in": "mlp_bias", "ffn_out": "mlp_bias", "attn_out": "attention_bias"},
    ),
}


def arch_for(model_or_type: nn.Module | str) -> ArchSpec:
    """The spec for a model (or a `model_type` string); a one-line error if unsupported."""
    model_type = (
        model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    )
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported types: {supported} "
            "(add an ArchSpec in microtune/arch.py for a new one)"
        ) from None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def output_dim(module: nn.Module) -> int:
    """Width of a layer's output: Linear, GPT-2's Conv1D (weight is (in, out)) or a norm."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    if hasattr(module, "normalized_shape"):
        return int(module.normalized_shape[0])
    if hasattr(module, "weight") and module.weight.dim() == 1:  # RMSNorm variants
        return module.weight.shape[0]
    raise TypeError(f"cannot tell the output width of {type(module).__name__}")


def ensure_bias(module: nn.Module) -> tuple[nn.Parameter, bool]:
    """Return the layer's bias, creating a frozen zero bias if it has none.

    Returns (bias, created). Folding a shift into a bias needs one; Llama's linears have none.
    """
    bias = getattr(module, "bias", None)
    if bias is not None:
        return bias, False
    weight = module.weight
    new = nn.Parameter(
        torch.zeros(output_dim(module), dtype=weight.dtype, device=weight.device),
        requires_grad=False,
    )
    module.bias = new
    return new, True
