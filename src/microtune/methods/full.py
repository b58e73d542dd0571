"""Full fine-tuning: every backbone parameter trains. The trained backbone is the merged model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from microtune.arch import ArchSpec
from microtune.methods.base import Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning options.

    Attributes:
        dropout: keep backbone dropout while training.
    """

    dropout: bool = True


class Full(Method):
    """Unfreezes the whole backbone. The artifact stores every backbone weight (and the head)."""

    name = "full"
    config_class = FullConfig
    default_learning_rate = 2e-5

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        for parameter in backbone.parameters():
            parameter.requires_grad_(True)

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        # The weights already are the model; freeze them again so the result is inference-only.
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        return []
