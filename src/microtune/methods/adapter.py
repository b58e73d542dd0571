"""Bottleneck adapters (Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021).

An adapter maps a sub-layer's output h to h + up(act(down(h))), with down (D -> m) and up
(m -> D). It sits on the output of the sub-layer's last projection, before the residual add
(and before the LayerNorm in post-LN models). Houlsby places one after the attention sub-layer
and one after the FFN of every block; Pfeiffer only after the FFN. The activation between the
projections makes the adapter impossible to fold into the base weights: it is not mergeable,
and serves unmerged.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec, output_dim
from microtune.methods.base import Method
from microtune.methods.configs.adapter import ACTIVATION_NAMES, ADAPTER_SITES, AdapterConfig

# The torch module of each name the configs accept (`configs.adapter.ACTIVATION_NAMES`).
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "configs.adapter.ACTIVATION_NAMES is out of date"


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
