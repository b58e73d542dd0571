"""SLaSh: one trainable vector z shifts every block through fixed random projections.

The shift of block l is s_l = z W_l, the same for every token and example, added at one
position of the block (methods.md §1), or at several ("output+attention": one z, a projection
per site). After training each shift folds into a bias, leaving the unmodified architecture.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec, ensure_bias, output_dim
from microtune.errors import MicrotuneError
from microtune.methods.configs.slash import POSITIONS as POSITIONS  # re-exported
from microtune.methods.configs.slash import SLaShConfig, positions
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
        self._parts: list[str] = []  # each site's arch part

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        # Position-major: every block of the first position, then of the next, so that the
        # first position's projections are those it has alone (the bank seeds by site index).
        layers = range(arch.num_layers(backbone))
        self._parts = [site_part(arch, p) for p in positions(self.config.position) for _ in layers]
        self._sites = [
            arch.block_part(backbone, site % len(layers), part)
            for site, part in enumerate(self._parts)
        ]
        widths = tuple(output_dim(site) for site in self._sites)
        self.build_bank(widths, next(backbone.parameters()).device)
        for index, site in enumerate(self._sites):
            self._hooks.append(site.register_forward_hook(partial(self._add_shift, index)))

    def shift(self, site: int) -> torch.Tensor:
        """s = z W for site `site` (with one position, the block of that index)."""
        return self.projected(site)

    def _add_shift(self, site: int, module: nn.Module, inputs, output: torch.Tensor):
        shift = self.shift(site)
        if shift.dim() == 2:  # per-example rows (B, D) in the DP path: one per sequence
            shift = shift[:, None]
        # Summed in float32 and rounded once to the activation's dtype (a no-op on a float32
        # base), as peft adds LoRA's update: closer to the float32 function than adding a
        # rounded shift to a rounded output.
        return (output + shift).to(output.dtype)

    @torch.no_grad()
    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        for part in dict.fromkeys(self._parts):
            sites = [site for site, p in zip(self._sites, self._parts, strict=True) if p == part]
            if part not in arch.bias_flags and any(site.bias is None for site in sites):
                # Checked before any weight changes: no stock model of the family has one.
                raise MicrotuneError(
                    f"slash: cannot merge at position '{self.config.position}' on "
                    f"{backbone.config.model_type}: its {getattr(arch, part)} has no bias and no "
                    "config flag adds one, so no stock model can hold the shift; serve the "
                    "artifact unmerged (`microtune eval`, `microtune.load`)"
                )
        created = []
        for index, (site, part) in enumerate(zip(self._sites, self._parts, strict=True)):
            bias, was_created = ensure_bias(site)
            bias.copy_(bias + self.shift(index))  # summed in float32, rounded once
            if was_created:
                created.append(part)
        self.detach()
        return sorted(set(created))
