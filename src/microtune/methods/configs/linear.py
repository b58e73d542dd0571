"""The linear probe's options (the layers: `microtune.methods.linear`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.methods.configs.base import MethodConfig


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear probe options."""

    dropout: bool = field(
        default=False,
        metadata={
            "help": (
                "keep backbone dropout while training (default off: the probe reads fixed "
                "features)."
            )
        },
    )
