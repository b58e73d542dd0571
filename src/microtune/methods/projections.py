"""Seeded random projections, one per layer, reproducible on any machine.

Each matrix W_l comes from its own `torch.Generator` seeded from (seed, layer), drawn on the CPU
in float32 and then moved, so the bank is bit-identical whatever the device, the order in which
layers are asked for, or what else used the global RNG before.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from microtune.common.choices import PROJECTION_INITS


def layer_seed(seed: int, layer: int) -> int:
    """A 63-bit generator seed from (seed, layer); a hash so nearby pairs do not correlate."""
    digest = hashlib.sha256(f"microtune-projection:{seed}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_projection(
    seed: int,
    layer: int,
    rows: int,
    cols: int,
    init: str = "normal",
    std_scale: float = 1.0,
) -> torch.Tensor:
    """W_l of shape (rows, cols) with entries of standard deviation std_scale / sqrt(rows).

    `init="normal"` draws N(0, std²); `init="uniform"` draws U(-a, a) with the same variance.
    Always float32 on the CPU; callers move and cast.
    """
    if init not in PROJECTION_INITS:
        raise ValueError(f"projection init '{init}' is unknown; use one of {PROJECTION_INITS}")
    generator = torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer))
    std = std_scale / math.sqrt(rows)
    # In place: one matrix alive at a time (memory-lean training draws these on every pass).
    if init == "normal":
        return torch.randn(rows, cols, generator=generator, dtype=torch.float32).mul_(std)
    half_width = std * math.sqrt(3.0)
    uniform = torch.rand(rows, cols, generator=generator, dtype=torch.float32)
    return uniform.mul_(2.0).sub_(1.0).mul_(half_width)


@dataclass(frozen=True)
class ProjectionBank:
    """The frozen projections of one method: W_l of shape (d, widths[l]) for each layer l.

    The bank is a recipe, not storage: `matrix(l)` regenerates W_l from the seed every time.
    Methods decide whether to keep the matrices (fast) or regenerate them (memory-lean).
    """

    seed: int
    d: int
    widths: tuple[int, ...]
    init: str = "normal"
    std_scale: float = 1.0

    def matrix(self, layer: int) -> torch.Tensor:
        return draw_projection(
            self.seed, layer, self.d, self.widths[layer], self.init, self.std_scale
        )

    def matrices(self) -> list[torch.Tensor]:
        return [self.matrix(layer) for layer in range(len(self.widths))]

    @property
    def num_values(self) -> int:
        return self.d * sum(self.widths)


class _SeededProjection(torch.autograd.Function):
    """s = z W_l with W_l regenerated from the seed in forward and again in backward.

    Nothing but the bank (a recipe) and the layer index is saved for backward, so no projection
    matrix outlives the call that drew it: memory-lean training trades drawing time for memory.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, bank: ProjectionBank, layer: int) -> torch.Tensor:
        ctx.bank, ctx.layer = bank, layer
        return z @ bank.matrix(layer).to(device=z.device, dtype=z.dtype)

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor):
        matrix = ctx.bank.matrix(ctx.layer).to(device=grad_s.device, dtype=grad_s.dtype)
        return grad_s @ matrix.T, None, None


def project_from_seed(z: torch.Tensor, bank: ProjectionBank, layer: int) -> torch.Tensor:
    """z W_l without keeping W_l: regenerated from the bank's seed in forward and backward."""
    return _SeededProjection.apply(z, bank, layer)
