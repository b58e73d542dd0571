"""JR-WARP's options (the layers: `microtune.methods.jrwarp`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from microtune.methods.configs.projected import ProjectedZConfig


@dataclass
class JRWARPConfig(ProjectedZConfig):
    """JR-WARP options: those of every projected-z method (see ProjectedZConfig)."""

    method_label: ClassVar[str] = "jrwarp"
