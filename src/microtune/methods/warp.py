"""WARP: k trainable prompt vectors prepended at the input (methods.md §3, a baseline)."""

from __future__ import annotations

import math

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.methods.configs.warp import PROMPT_INITS as PROMPT_INITS  # re-exported
from microtune.methods.configs.warp import WARPConfig
from microtune.methods.prompts import PromptMethod, block_inputs


class WARP(PromptMethod):
    """Trains k prompt vectors of the hidden size, in front of every sequence."""

    name = "warp"
    config_class = WARPConfig
    default_learning_rate = 3e-3

    def __init__(self, config: WARPConfig):
        super().__init__(config)
        self.num_prompts = config.num_prompts
        self.prompts: nn.Parameter | None = None  # (k, D), created at attach: D is the model's

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        device = next(backbone.parameters()).device
        k, hidden = self.num_prompts, backbone.config.hidden_size
        if self.config.prompt_init == "tokens":
            token_ids = torch.randint(backbone.config.vocab_size, (k,))
            start = block_inputs(backbone, arch, token_ids.to(device))
        else:
            start = torch.randn(k, hidden) / math.sqrt(hidden)
        self.prompts = nn.Parameter(start.to(device=device, dtype=torch.float32).clone())
        self.attach_prompts(backbone, arch)

    def layer_prompts(self) -> dict[int, torch.Tensor]:
        return {0: self.prompts}
