"""The part SLaSh and JR-WARP share: one trainable vector z read through seeded projections.

Layer l sees z W_l, with W_l from a `ProjectionBank` (methods.md §1-2). The matrices are either
kept as non-persistent buffers (fast) or, with `memory_lean`, regenerated from the seed in the
forward and backward pass of a custom autograd function (no projection memory).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from microtune.methods.base import Method
from microtune.methods.configs.projected import MAX_D as MAX_D  # re-exported
from microtune.methods.configs.projected import Z_INITS as Z_INITS  # re-exported
from microtune.methods.configs.projected import ProjectedZConfig
from microtune.methods.projections import ProjectionBank, project_from_seed


def init_z(d: int, mode: str) -> torch.Tensor:
    if mode == "zeros":
        return torch.zeros(d)
    return torch.randn(d) / math.sqrt(d)


class ProjectedZMethod(Method):
    """Base class: owns z (the only trainable tensor) and the projection bank."""

    config: ProjectedZConfig

    def __init__(self, config: ProjectedZConfig):
        super().__init__(config)
        self.z = nn.Parameter(init_z(config.d, config.z_init))
        self.bank: ProjectionBank | None = None
        self._z_rows: torch.Tensor | None = None  # per-example z_b (B, d) inside the DP path

    def build_bank(self, widths: tuple[int, ...], device: torch.device) -> None:
        """Create the bank for layers of these widths; store the matrices unless memory-lean."""
        c = self.config
        self.bank = ProjectionBank(
            seed=c.projection_seed,
            d=c.d,
            widths=widths,
            init=c.projection_init,
            std_scale=c.projection_std_scale,
        )
        self.to(device)
        if c.memory_lean:
            return
        for layer, matrix in enumerate(self.bank.matrices()):
            # Non-persistent: regenerated from the seed, never saved.
            self.register_buffer(f"projection_{layer}", matrix.to(device), persistent=False)

    def projection(self, layer: int) -> torch.Tensor:
        """W_l: the stored buffer, or a fresh draw when memory-lean."""
        if self.config.memory_lean:
            return self.bank.matrix(layer).to(self.z.device)
        return getattr(self, f"projection_{layer}")

    def projected(self, layer: int) -> torch.Tensor:
        """z W_l (D,), differentiable in z on both paths; (B, D) rows z_b W_l in the DP path."""
        z = self.z if self._z_rows is None else self._z_rows
        if self.config.memory_lean:
            return project_from_seed(z, self.bank, layer)
        return z @ self.projection(layer)

    def per_example_parameters(self, batch_size: int):
        """z replaced by a leaf z_b of shape (B, d): one backward of the summed loss gives
        ∂L_b/∂z = Σ_l g_{b,l} W_lᵀ in row b (methods.md §7), no per-example weight gradient."""
        return self._per_example_z(batch_size)

    @contextlib.contextmanager
    def _per_example_z(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        self._z_rows = self.z.detach().expand(batch_size, -1).clone().requires_grad_(True)
        try:
            yield {"z": self._z_rows}
        finally:
            self._z_rows = None
