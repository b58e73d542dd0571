"""WARP: k trainable prompt vectors prepended at the input (methods.md §3, a baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from microtune.arch import ArchSpec
from microtune.errors import MicrotuneError
from microtune.methods.base import MethodConfig
from microtune.methods.prompts import PromptMethod, block_inputs

PROMPT_INITS = ("tokens", "normal")


@dataclass
class WARPConfig(MethodConfig):
    """WARP options.

    Attributes:
        num_prompts: number k of trainable prompt vectors prepended at the input layer.
        prompt_init: "tokens" (each prompt starts as the first block's input for a random
            vocabulary token, so it has the scale of real inputs) or "normal" N(0, 1/D).
        dropout: keep backbone dropout while training (off, as for SLaSh and JR-WARP).
    """

    num_prompts: int = 20
    prompt_init: str = "tokens"
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise MicrotuneError(
                f"warp: num_prompts must be a positive integer, got {self.num_prompts}"
            )
        if self.prompt_init not in PROMPT_INITS:
            raise MicrotuneError(
                f"warp: prompt_init '{self.prompt_init}' unknown; use {PROMPT_INITS}"
            )


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
