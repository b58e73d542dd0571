"""WARP's options (the layers: `microtune.methods.warp`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig

PROMPT_INITS = ("tokens", "normal")


@dataclass
class WARPConfig(MethodConfig):
    """WARP options."""

    num_prompts: int = field(
        default=20,
        metadata={"help": "number k of trainable prompt vectors prepended at the input layer."},
    )
    prompt_init: str = field(
        default="tokens",
        metadata={
            "help": (
                '"tokens" (each prompt starts as the first block\'s input for a random '
                'vocabulary token, so it has the scale of real inputs) or "normal" N(0, 1/D).'
            )
        },
    )
    dropout: bool = field(
        default=False,
        metadata={"help": "keep backbone dropout while training (off, as for SLaSh and JR-WARP)."},
    )

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise MicrotuneError(
                f"warp: num_prompts must be a positive integer, got {self.num_prompts}"
            )
        if self.prompt_init not in PROMPT_INITS:
            raise MicrotuneError(
                f"warp: prompt_init '{self.prompt_init}' unknown; use {PROMPT_INITS}"
            )
