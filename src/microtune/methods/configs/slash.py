"""SLaSh's options (the layers: `microtune.methods.slash`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from microtune.errors import MicrotuneError
from microtune.methods.configs.projected import ProjectedZConfig

# Where the shift is added, as the arch part whose output (and bias) receives it.
POSITIONS = ("output", "intermediate", "attention")


def positions(position: str) -> tuple[str, ...]:
    """The positions of a `position` value: one, or several joined by "+"."""
    return tuple(position.split("+"))


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
                'pre-LN ones); several joined by "+" (e.g. "output+attention") shift every '
                "block at each, one z through a projection per site."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parts = positions(self.position)
        if not set(parts) <= set(POSITIONS) or len(set(parts)) != len(parts):
            raise MicrotuneError(
                f"slash: position '{self.position}' unknown; use one of {POSITIONS}, or "
                'several joined by "+" without repeats (e.g. "output+attention")'
            )
