"""Linear probe: the backbone stays frozen and only the task head trains."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from microtune.arch import ArchSpec
from microtune.methods.base import Method, MethodConfig


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear probe options.

    Attributes:
        dropout: keep backbone dropout while training (default off: the probe reads fixed
            features).
    """

    dropout: bool = False


class LinearProbe(Method):
    """Attaches nothing: the head (added by `TaskModel`) is the only trainable part."""

    name = "linear"
    config_class = LinearProbeConfig
    default_learning_rate = 5e-3

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        pass

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        return []
