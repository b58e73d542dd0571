"""SLaSh's options (the layers: `microtune.methods.slash`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from microtune.errors import MicrotuneError
from microtune.methods.configs.projected import ProjectedZConfig

# Where the shift is added, as the arch part whose output (and bias) receives it.
POSITIONS = ("output", "intermediate", "attention")


@dataclass
class SLaShConfig(ProjectedZConfig):
    """SLaSh options: those of ProjectedZConfig, plus where the shift goes."""

    method_label: ClassVar[str] = "slash"

    position: str = field(
        default="output",
        metadata={
            "help": (
                '"output" (after the FFN\'s second linear, folds into its bias), "intermediate" '
                '(the FFN\'s first linear, before the activation) or "attention" (after the '
                "attention LayerNorm in post-LN models; on the attention output projection in "
                "pre-LN ones)."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position not in POSITIONS:
            raise MicrotuneError(f"slash: position '{self.position}' unknown; use {POSITIONS}")
