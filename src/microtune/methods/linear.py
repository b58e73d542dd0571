"""Linear probe: the backbone stays frozen and only the task head trains."""

from __future__ import annotations

from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.methods.base import Method
from microtune.methods.configs.linear import LinearProbeConfig


class LinearProbe(Method):
    """Attaches nothing: the head (added by `TaskModel`) is the only trainable part."""

    name = "linear"
    config_class = LinearProbeConfig
    default_learning_rate = 5e-3
    mixed_batch = "bias"  # with no bias row at all: only its head differs

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        pass

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        return []
