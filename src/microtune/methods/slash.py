"""SLaSh: one trainable vector z shifts every block through fixed random projections.

The shift of block l is s_l = z W_l, the same for every token and example, added at one
position of the block (methods.md §1). After training each s_l folds into a bias, leaving the
unmodified architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from microtune.arch import ArchSpec, ensure_bias, output_dim
from microtune.errors import MicrotuneError
from microtune.methods.base import Method, MethodConfig
from microtune.projections import PROJECTION_INITS, ProjectionBank

# Where the shift is added, as the arch part whose output (and bias) receives it.
POSITIONS = ("output", "intermediate", "attention")
Z_INITS = ("normal", "zeros")


@dataclass
class SLaShConfig(MethodConfig):
    """SLaSh options.

    Attributes:
        d: length of the trainable vector z.
        position: "output" (after the FFN's second linear, folds into its bias), "intermediate"
            (the FFN's first linear, before the activation) or "attention" (after the attention
            LayerNorm in post-LN models; on the attention output projection in pre-LN ones).
        projection_seed: seed of the projection bank; the artifact stores it, not the matrices.
        projection_init: "normal" N(0, 1/d) or "uniform" with the same variance.
        projection_std_scale: multiplies the projections' standard deviation (2, 0.5, or
            sqrt(2), sqrt(0.5) for the variance-scaled variants).
        z_init: "normal" N(0, 1/d), or "zeros" so the model starts at the pretrained function.
        dropout: keep backbone dropout while training (the original code turned it off).
    """

    d: int = 1024
    position: str = "output"
    projection_seed: int = 0
    projection_init: str = "normal"
    projection_std_scale: float = 1.0
    z_init: str = "normal"
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.d < 1:
            raise MicrotuneError(f"slash: d must be a positive integer, got {self.d}")
        if self.position not in POSITIONS:
            raise MicrotuneError(f"slash: position '{self.position}' unknown; use {POSITIONS}")
        if self.projection_init not in PROJECTION_INITS:
            raise MicrotuneError(
                f"slash: projection_init '{self.projection_init}' unknown; use {PROJECTION_INITS}"
            )
        if self.z_init not in Z_INITS:
            raise MicrotuneError(f"slash: z_init '{self.z_init}' unknown; use {Z_INITS}")
        if not self.projection_std_scale > 0:
            raise MicrotuneError("slash: projection_std_scale must be positive")


def site_part(arch: ArchSpec, position: str) -> str:
    """The arch part whose output receives the shift at `position`."""
    if position == "output":
        return "ffn_out"
    if position == "intermediate":
        return "ffn_in"
    # Post-LN: after the attention LayerNorm (folds into its bias). Pre-LN has no LayerNorm
    # after attention, so the shift goes on the attention output projection instead.
    return "attn_norm" if arch.attn_norm else "attn_out"


def init_z(d: int, mode: str) -> torch.Tensor:
    if mode == "zeros":
        return torch.zeros(d)
    return torch.randn(d) / math.sqrt(d)


class SLaSh(Method):
    name = "slash"
    config_class = SLaShConfig
    default_learning_rate = 2e-2

    def __init__(self, config: SLaShConfig):
        super().__init__(config)
        self.z = nn.Parameter(init_z(config.d, config.z_init))
        self.bank: ProjectionBank | None = None
        self._sites: list[nn.Module] = []

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        part = site_part(arch, self.config.position)
        self._sites = [
            arch.block_part(backbone, layer, part) for layer in range(arch.num_layers(backbone))
        ]
        c = self.config
        self.bank = ProjectionBank(
            seed=c.projection_seed,
            d=c.d,
            widths=tuple(output_dim(site) for site in self._sites),
            init=c.projection_init,
            std_scale=c.projection_std_scale,
        )
        device = next(backbone.parameters()).device
        self.to(device)
        for layer, matrix in enumerate(self.bank.matrices()):
            # Non-persistent: regenerated from the seed, never saved.
            self.register_buffer(f"projection_{layer}", matrix.to(device), persistent=False)
        for layer, site in enumerate(self._sites):
            self._hooks.append(site.register_forward_hook(partial(self._add_shift, layer)))

    def projection(self, layer: int) -> torch.Tensor:
        return getattr(self, f"projection_{layer}")

    def shift(self, layer: int) -> torch.Tensor:
        """s_l = z W_l."""
        return self.z @ self.projection(layer)

    def _add_shift(self, layer: int, module: nn.Module, inputs, output: torch.Tensor):
        return output + self.shift(layer).to(output.dtype)

    @torch.no_grad()
    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        created = []
        for layer, site in enumerate(self._sites):
            bias, was_created = ensure_bias(site)
            bias.add_(self.shift(layer).to(bias.dtype))
            if was_created:
                created.append(site_part(arch, self.config.position))
        self.detach()
        return sorted(set(created))
