"""BitFit (Ben Zaken, Goldberg, Ravfogel, ACL 2022): only the biases (and the head) train.

Every bias of the backbone, LayerNorm biases included, becomes trainable. The trained biases
are ordinary backbone parameters, so merging is a no-op. Families whose linears have no biases
(Llama) have nothing to train unless `create_missing_biases` adds zero biases; the merge then
switches on the config flags that make a stock model carry them. On a base loaded below
float32 the biases train as float32 copies (`microtune.methods.masters`).
"""

from __future__ import annotations

import warnings

from torch import nn

from microtune.backbone.arch import ArchSpec, ensure_bias
from microtune.methods.configs.bitfit import BitFitConfig
from microtune.methods.masters import BackboneTensorMethod


def _flag_part(arch: ArchSpec, path_in_block: str) -> str | None:
    """The bias-flag part (e.g. "ffn_out") whose flag governs the linear at this block path.

    A flag covers every linear in the same sub-layer as its part: Llama's `attention_bias`
    switches on q, k, v and o projections, `mlp_bias` gate, up and down."""
    for part in arch.bias_flags:
        sublayer = getattr(arch, part).rsplit(".", 1)[0]
        if path_in_block.startswith(sublayer + "."):
            return part
    return None


class BitFit(BackboneTensorMethod):
    name = "bitfit"
    config_class = BitFitConfig
    default_learning_rate = 1e-3
    mixed_batch = "bias"

    def __init__(self, config: BitFitConfig):
        super().__init__(config)
        self._created_parts: list[str] = []

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        if self.config.create_missing_biases:
            self._created_parts = self._create_biases(backbone, arch)
        biases = [name for name, _ in backbone.named_parameters() if name.split(".")[-1] == "bias"]
        if not biases:
            warnings.warn(
                f"bitfit: this {backbone.config.model_type} backbone has no biases, so only the "
                "head trains; pass create_missing_biases=True (--create-missing-biases)",
                stacklevel=2,
            )
        self.train_backbone_tensors(backbone, biases)

    @staticmethod
    def _create_biases(backbone: nn.Module, arch: ArchSpec) -> list[str]:
        created = set()
        for block in arch.blocks_of(backbone):
            for path, module in block.named_modules():
                part = _flag_part(arch, path)
                if isinstance(module, nn.Linear) and part and ensure_bias(module)[1]:
                    created.add(part)
        return sorted(created)

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        self.merge_backbone_tensors(backbone)
        return self._created_parts
