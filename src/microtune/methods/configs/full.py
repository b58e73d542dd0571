"""Full fine-tuning's options (the layers: `microtune.methods.full`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.methods.configs.base import MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning options."""

    dropout: bool = field(default=True, metadata={"help": "keep backbone dropout while training."})
