"""HiWi's options (the layers: `microtune.methods.hiwi`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.errors import MicrotuneError
from microtune.methods.configs.adapter import ACTIVATION_NAMES
from microtune.methods.configs.base import MethodConfig

VARIANTS = ("bias", "weight")


@dataclass
class HiWiConfig(MethodConfig):
    """HiWi options."""

    variant: str = field(
        default="bias",
        metadata={
            "help": (
                '"bias" (adapt the FFN biases b1, b2; the artifact stores only the new biases) '
                'or "weight" (adapt the FFN weights W1, W2 row-wise along the input dimension).'
            )
        },
    )
    r: int = field(
        default=8,
        metadata={
            "help": (
                "adapter bottleneck (A is n x r, B is r x n). The bias variant's artifact size "
                "does not depend on it."
            )
        },
    )
    activation: str = field(
        default="relu",
        metadata={
            "help": "f in P' = P + f(P A) B: relu (default, as in the paper), gelu, tanh, silu."
        },
    )
    dropout: bool = field(default=True, metadata={"help": "keep backbone dropout while training."})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise MicrotuneError(f"hiwi: variant '{self.variant}' unknown; use {VARIANTS}")
        if self.r < 1:
            raise MicrotuneError(f"hiwi: r must be a positive integer, got {self.r}")
        if self.activation not in ACTIVATION_NAMES:
            raise MicrotuneError(
                f"hiwi: activation '{self.activation}' unknown; use {ACTIVATION_NAMES}"
            )
