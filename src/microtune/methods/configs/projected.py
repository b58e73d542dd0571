"""The options SLaSh and JR-WARP share: one vector z read through seeded projections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from microtune.common.choices import PROJECTION_INITS
from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig

Z_INITS = ("normal", "zeros")
MAX_D = 2**20


@dataclass
class ProjectedZConfig(MethodConfig):
    """Options of every method that trains z through a projection bank."""

    # Prefix of this config's error messages.
    method_label: ClassVar[str] = "projected"

    d: int = field(default=1024, metadata={"help": "length of the trainable vector z."})
    projection_seed: int = field(
        default=0,
        metadata={"help": "seed of the projection bank; the artifact stores it, not the matrices."},
    )
    projection_init: str = field(
        default="normal",
        metadata={"help": '"normal" N(0, 1/d) or "uniform" with the same variance.'},
    )
    projection_std_scale: float = field(
        default=1.0,
        metadata={
            "help": (
                "multiplies the projections' standard deviation (2, 0.5, or sqrt(2), sqrt(0.5) "
                "for the variance-scaled variants)."
            )
        },
    )
    z_init: str = field(
        default="normal",
        metadata={
            "help": (
                '"normal" N(0, 1/d), or "zeros" (SLaSh then starts exactly at the pretrained '
                "function; JR-WARP's prompt starts as a zero vector)."
            )
        },
    )
    memory_lean: bool = field(
        default=False,
        metadata={
            "help": (
                "keep no projection matrix in memory: regenerate W_l from its seed in the "
                "forward and backward pass (less memory, more time; same gradients)."
            )
        },
    )
    dropout: bool = field(
        default=False,
        metadata={
            "help": "keep backbone dropout while training (the original code turned it off)."
        },
    )

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
