"""SLaSh: one trainable vector z shifts every block through fixed random projections.

The shift of block l is s_l = z W_l, the same for every token and example, added at one
position of the block (methods.md §1). After training each s_l folds into a bias, leaving the
unmodified architecture.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec, ensure_bias, output_dim
from microtune.errors import MicrotuneError
from microtune.methods.configs.slash import POSITIONS as POSITIONS  # re-exported
from microtune.methods.configs.slash import SLaShConfig
from microtune.methods.projected import ProjectedZMethod


def site_part(arch: ArchSpec, position: str) -> str:
    """The arch part whose output receives the shift at `position`."""
    if position == "output":
        return "ffn_out"
    if position == "intermediate":
        return "ffn_in"
    # Post-LN: after the attention LayerNorm (folds into its bias). Pre-LN has no LayerNorm
    # after attention, so the shift goes on the attention output projection instead.
    return "attn_norm" if arch.attn_norm else "attn_out"


class SLaSh(ProjectedZMethod):
    """Adds s_l = z W_l inside every block; folds into biases at merge time."""

    name = "slash"
    config_class = SLaShConfig
    default_learning_rate = 2e-2
    mixed_batch = "bias"  # merged, the shifts are biases

    def __init__(self, config: SLaShConfig):
        super().__init__(config)
        self._sites: list[nn.Module] = []

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        part = site_part(arch, self.config.position)
        self._sites = [
            arch.block_part(backbone, layer, part) for layer in range(arch.num_layers(backbone))
        ]
        widths = tuple(output_dim(site) for site in self._sites)
        self.build_bank(widths, next(backbone.parameters()).device)
        for layer, site in enumerate(self._sites):
            self._hooks.append(site.register_forward_hook(partial(self._add_shift, layer)))

    def shift(self, layer: int) -> torch.Tensor:
        """s_l = z W_l."""
        return self.projected(layer)

    def _add_shift(self, layer: int, module: nn.Module, inputs, output: torch.Tensor):
        shift = self.shift(layer)
        if shift.dim() == 2:  # per-example rows (B, D) in the DP path: one per sequence
            shift = shift[:, None]
        # Summed in float32 and rounded once to the activation's dtype (a no-op on a float32
        # base), as peft adds LoRA's update: closer to the float32 function than adding a
        # rounded shift to a rounded output.
        return (output + shift).to(output.dtype)

    @torch.no_grad()
    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        part = site_part(arch, self.config.position)
        if part not in arch.bias_flags and any(site.bias is None for site in self._sites):
            # Checked before any weight changes: no stock model of this family has a bias there.
            raise MicrotuneError(
                f"slash: cannot merge at position '{self.config.position}' on "
                f"{backbone.config.model_type}: its {getattr(arch, part)} has no bias and no "
                "config flag adds one, so no stock model can hold the shift; serve the artifact "
                "unmerged (`microtune eval`, `microtune.load`)"
            )
        created = []
        for layer, site in enumerate(self._sites):
            bias, was_created = ensure_bias(site)
            bias.copy_(bias + self.shift(layer))  # summed in float32, rounded once
            if was_created:
                created.append(site_part(arch, self.config.position))
        self.detach()
        return sorted(set(created))
