"""Bottleneck adapters (Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021).

An adapter maps a sub-layer's output h to h + up(act(down(h))), with down (D -> m) and up
(m -> D). It sits on the output of the sub-layer's last projection, before the residual add
(and before the LayerNorm in post-LN models). Houlsby places one after the attention sub-layer
and one after the FFN of every block; Pfeiffer only after the FFN. The activation between the
projections makes the adapter impossible to fold into the base weights: it is not mergeable,
and serves unmerged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from microtune.arch import ArchSpec, output_dim
from microtune.errors import MicrotuneError
from microtune.methods.base import Method, MethodConfig

# Which sub-layer outputs get an adapter, as arch parts.
ADAPTER_SITES = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapter options.

    Attributes:
        adapter_type: "houlsby" (after the attention sub-layer and after the FFN of every block)
            or "pfeiffer" (after the FFN only).
        bottleneck: adapter width m; 0 means hidden size // reduction_factor.
        reduction_factor: hidden size / adapter width, used when bottleneck is 0.
        activation: nonlinearity between the down and up projections: relu, gelu, tanh, silu
            (or its alias swish).
        dropout: keep backbone dropout while training.
    """

    adapter_type: str = "houlsby"
    bottleneck: int = 0
    reduction_factor: int = 16
    activation: str = "relu"
    dropout: bool = True

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
        if self.activation not in ACTIVATIONS:
            raise MicrotuneError(
                f"adapter: activation '{self.activation}' unknown; use {tuple(ACTIVATIONS)}"
            )

    def width(self, hidden_size: int) -> int:
        return self.bottleneck or max(1, hidden_size // self.reduction_factor)


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), initialised near the identity as in Houlsby et al.: weights from a
    zero-mean normal with std 1e-2 truncated at two standard deviations, biases zero."""

    def __init__(self, hidden_size: int, width: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, width)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden_size)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.activation(self.down(hidden)))


class Adapter(Method):
    name = "adapter"
    config_class = AdapterConfig
    mergeable = False
    default_learning_rate = 1e-3

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        # One ModuleList per site, indexed by layer: names like adapters.ffn_out.3.down.weight.
        self.adapters = nn.ModuleDict()

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        c = self.config
        layers = range(arch.num_layers(backbone))
        device = next(backbone.parameters()).device
        for part in ADAPTER_SITES[c.adapter_type]:
            sites = [arch.block_part(backbone, layer, part) for layer in layers]
            self.adapters[part] = nn.ModuleList(
                BottleneckAdapter(output_dim(site), c.width(output_dim(site)), c.activation)
                for site in sites
            )
            for layer, site in enumerate(sites):
                hook = partial(self._adapt, part, layer)
                self._hooks.append(site.register_forward_hook(hook))
        self.to(device)

    def _adapt(self, part: str, layer: int, module: nn.Module, inputs, output: torch.Tensor):
        adapter = self.adapters[part][layer]
        return adapter(output.to(adapter.up.weight.dtype)).to(output.dtype)
