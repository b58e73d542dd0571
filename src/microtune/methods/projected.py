"""The part SLaSh and JR-WARP share: one trainable vector z read through seeded projections.

Layer l sees z W_l, with W_l from a `ProjectionBank` (methods.md §1-2). The matrices are either
kept as non-persistent buffers (fast) or, with `memory_lean`, regenerated from the seed in the
forward and backward pass of a custom autograd function (no projection memory).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.methods.base import Method, MethodConfig
from microtune.projections import PROJECTION_INITS, ProjectionBank, project_from_seed

Z_INITS = ("normal", "zeros")
MAX_D = 2**20


@dataclass
class ProjectedZConfig(MethodConfig):
    """Options of every method that trains z through a projection bank.

    Attributes:
        d: length of the trainable vector z.
        projection_seed: seed of the projection bank; the artifact stores it, not the matrices.
        projection_init: "normal" N(0, 1/d) or "uniform" with the same variance.
        projection_std_scale: multiplies the projections' standard deviation (2, 0.5, or
            sqrt(2), sqrt(0.5) for the variance-scaled variants).
        z_init: "normal" N(0, 1/d), or "zeros" (SLaSh then starts exactly at the pretrained
            function; JR-WARP's prompt starts as a zero vector).
        memory_lean: keep no projection matrix in memory: regenerate W_l from its seed in the
            forward and backward pass (less memory, more time; same gradients).
        dropout: keep backbone dropout while training (the original code turned it off).
    """

    # Prefix of this config's error messages.
    method_label: ClassVar[str] = "projected"

    d: int = 1024
    projection_seed: int = 0
    projection_init: str = "normal"
    projection_std_scale: float = 1.0
    z_init: str = "normal"
    memory_lean: bool = False
    dropout: bool = False

    def __post_init__(self) -> None:
        name = self.method_label
        if not 1 <= self.d <= MAX_D:
            # d x D floats per block: past 2^20 even MiniLM's projections need 9 GB.
            raise MicrotuneError(f"{name}: d must be an integer in 1..{MAX_D}, got {self.d}")
        if self.projection_init not in PROJECTION_INITS:
            raise MicrotuneError(
                f"{name}: projection_init '{self.projection_init}' unknown; use {PROJECTION_INITS}"
            )
        if self.z_init not in Z_INITS:
            raise MicrotuneError(f"{name}: z_init '{self.z_init}' unknown; use {Z_INITS}")
        if not self.projection_std_scale > 0:
            raise MicrotuneError(f"{name}: projection_std_scale must be positive")


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
