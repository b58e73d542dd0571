"""JR-WARP: one prompt position driven by z through the SLaSh projections (methods.md §2).

Block 1 sees z W_1 as a new position 0; before every later block l, z W_l is added to the
hidden state at that position. The prompt vectors depend only on z, so without gradients they
are computed once and cached until z changes.
"""

from __future__ import annotations

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.methods.configs.jrwarp import JRWARPConfig
from microtune.methods.projected import ProjectedZMethod
from microtune.methods.prompts import PromptMethod


class JRWARP(PromptMethod, ProjectedZMethod):
    """One prompt position whose vector in block l is z W_l (replaced in block 0, then added)."""

    name = "jrwarp"
    config_class = JRWARPConfig
    default_learning_rate = 2e-2
    num_prompts = 1

    def __init__(self, config: JRWARPConfig):
        super().__init__(config)
        # Set to False to recompute the prompts on every forward pass (tests compare the two).
        self.cache_prompts = True
        self._cache: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        widths = (backbone.config.hidden_size,) * arch.num_layers(backbone)
        self.build_bank(widths, next(backbone.parameters()).device)
        self.attach_prompts(backbone, arch)

    def prompt_vectors(self) -> dict[int, torch.Tensor]:
        """z W_l as a (1, D) prompt, for every block l ((B, 1, D) rows in the DP path)."""
        vectors = (self.projected(layer) for layer in range(len(self.bank.widths)))
        return {layer: v[None] if v.dim() == 1 else v[:, None] for layer, v in enumerate(vectors)}

    def layer_prompts(self) -> dict[int, torch.Tensor]:
        training = torch.is_grad_enabled() and self.z.requires_grad
        if training or not self.cache_prompts or self._z_rows is not None:
            return self.prompt_vectors()
        # Inference: the prompts are constants of z. Comparing values (O(d)) rather than a
        # version counter also catches writes through `z.data`.
        if self._cache is None or not _same(self._cache[0], self.z):
            with torch.no_grad():
                self._cache = (self.z.detach().clone(), self.prompt_vectors())
        return self._cache[1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and torch.equal(a, b.detach())
