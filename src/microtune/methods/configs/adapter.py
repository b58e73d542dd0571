"""Bottleneck adapters' options (the layers: `microtune.methods.adapter`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig

# Which sub-layer outputs get an adapter, as arch parts.
ADAPTER_SITES = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",)}
# The nonlinearities an adapter (and HiWi) offers; `microtune.methods.adapter.ACTIVATIONS` maps
# each name to its torch module.
ACTIVATION_NAMES = ("relu", "gelu", "tanh", "silu", "swish")


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapter options."""

    adapter_type: str = field(
        default="houlsby",
        metadata={
            "help": (
                '"houlsby" (after the attention sub-layer and after the FFN of every block) or '
                '"pfeiffer" (after the FFN only).'
            )
        },
    )
    bottleneck: int = field(
        default=0, metadata={"help": "adapter width m; 0 means hidden size // reduction_factor."}
    )
    reduction_factor: int = field(
        default=16, metadata={"help": "hidden size / adapter width, used when bottleneck is 0."}
    )
    activation: str = field(
        default="relu",
        metadata={
            "help": (
                "nonlinearity between the down and up projections: relu, gelu, tanh, silu (or "
                "its alias swish)."
            )
        },
    )
    dropout: bool = field(default=True, metadata={"help": "keep backbone dropout while training."})

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_SITES:
            raise MicrotuneError(
                f"adapter: adapter_type '{self.adapter_type}' unknown; use {tuple(ADAPTER_SITES)}"
            )
        if self.bottleneck < 0:
            raise MicrotuneError(f"adapter: bottleneck must be >= 0, got {self.bottleneck}")
        if self.reduction_factor < 1:
            raise MicrotuneError(
                f"adapter: reduction_factor must be a positive integer, got {self.reduction_factor}"
            )
        if self.activation not in ACTIVATION_NAMES:
            raise MicrotuneError(
                f"adapter: activation '{self.activation}' unknown; use {ACTIVATION_NAMES}"
            )

    def width(self, hidden_size: int) -> int:
        return self.bottleneck or max(1, hidden_size // self.reduction_factor)
