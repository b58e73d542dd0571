"""LoRA's options (the layers: `microtune.methods.lora`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA options."""

    rank: int = field(default=8, metadata={"help": "rank r of the update B A."})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the LoRA branch's input (the frozen path is unaffected)."},
    )
    target_modules: str = field(
        default="",
        metadata={
            "help": (
                "comma-separated layer names; a layer matches when its dotted path equals a "
                'name or ends with "." + name (e.g. "query,value" or "attn.c_attn"). Empty: the '
                "architecture's attention query and value (GPT-2: its fused c_attn)."
            )
        },
    )
    dropout: bool = field(default=True, metadata={"help": "keep backbone dropout while training."})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise MicrotuneError(f"lora: rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise MicrotuneError(f"lora: alpha must be positive, got {self.alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise MicrotuneError(f"lora: lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
