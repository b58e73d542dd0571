"""The architecture map's vocabulary: `ArchSpec` (where things live inside one family's
blocks) and helpers that read a module's shape whatever its layer type (`Linear`, GPT-2's
`Conv1D`). The map itself is `backbone.arch`; discovery (`backbone.discovery`) builds specs
for families it does not declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from microtune.errors import MicrotuneError


class UnsupportedModelError(MicrotuneError):
    """The model type is neither declared in the architecture map nor discoverable."""


@dataclass(frozen=True)
class ArchSpec:
    """Locations of the parts of one architecture family.

    Attributes:
        blocks: the ModuleList of transformer blocks, from the backbone.
        attn_out: the attention output projection (before the residual add).
        attn_norm: the LayerNorm applied after the attention residual (post-LN models only).
        ffn_in: the FFN's first linear, whose output goes into the activation. Where gate and
            up projections are fused into one linear (Phi-3, ModernBERT) it is that linear,
            twice the intermediate size wide.
        ffn_out: the FFN's second linear (down projection), before the residual add.
        norms: every normalisation layer of a block, in the order the block calls them.
        embeddings: the token embedding table, from the backbone.
        pooler: the backbone's pooler module (fed the whole sequence), if the family has one.
        pre_norm: True for pre-LayerNorm blocks (GPT-2, Llama).
        causal: True for decoders (causal attention; read the last token).
        bias_flags: config attributes that switch on the biases of a layer family, for families
            whose linears have none (Llama). A method that creates a bias there sets the flag
            when exporting, so the merged model is still a stock `transformers` model. A part
            with no bias and no flag (Mistral's FFN) cannot take a created bias: such merges
            are refused.
        attention: query, key and value projections (default LoRA targets are query and value).
        token_type_ids: the backbone takes segment ids (BERT-style pair encoding).
        seq_cls_classifier: attribute of `AutoModelForSequenceClassification` that holds the
            final linear when that class reads the backbone's pooler (BERT); None where the
            pooler read-out cannot be exported to that class.
        weight_candidates: block-relative paths of the layers whose weights PaFi may select
            from; empty (the default, right for every family so far): every Linear (or GPT-2
            Conv1D) inside a block, i.e. attention q, k, v, output and every FFN linear.
        config_assumes: config values the paths rely on; another value is refused.
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
    weight_candidates: tuple[str, ...] = ()
    config_assumes: dict[str, Any] = field(default_factory=dict)

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


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D"


def input_dim(module: nn.Module) -> int:
    """Width of a Linear's (or GPT-2 Conv1D's) input."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.weight.shape[0]
    raise TypeError(f"cannot tell the input width of {type(module).__name__}")


def output_dim(module: nn.Module) -> int:
    """Width of a layer's output: Linear, GPT-2's Conv1D (weight is (in, out)) or a norm."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.weight.shape[1]
    if hasattr(module, "normalized_shape"):
        return int(module.normalized_shape[0])
    if getattr(module, "weight", None) is not None and module.weight.dim() == 1:  # RMSNorms
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
