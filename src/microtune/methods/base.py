"""What every method is: a config dataclass and a module that attaches to a backbone.

A method never reads the CLI and never sees the trainer. It gets a loaded `transformers`
backbone (frozen by `TaskModel` before `attach`) and the architecture map entry, adds its
parameters and hooks, and later folds itself back into the weights with `merge`.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from microtune.arch import ArchSpec
from microtune.errors import MicrotuneError


@dataclass
class MethodConfig:
    """Fields every method has.

    Attributes:
        dropout: keep the backbone's dropout active while training. SLaSh and JR-WARP default
            to off, as in the original code; methods that train backbone weights default to on.
    """

    dropout: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MicrotuneError(
                f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(known)}"
            )
        return cls(**values)


class Method(nn.Module, abc.ABC):
    """Base class of every fine-tuning method. Subclasses set the class attributes below."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # False for methods whose extra modules cannot fold into the base weights (adapters, prompts).
    mergeable: ClassVar[bool] = True
    # A learning rate that works for this method with AdamW on a GLUE task.
    default_learning_rate: ClassVar[float] = 1e-3

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @abc.abstractmethod
    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        """Add this method's parameters and hooks to a frozen backbone, in place."""

    def run_backbone(self, backbone: nn.Module, **inputs: torch.Tensor) -> Any:
        """Run the backbone; prompt methods override this to add positions to the input."""
        return backbone(**inputs)

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        """Fold this method into the backbone's weights and detach it.

        Returns the arch parts (e.g. "ffn_out") where a bias had to be created, so the caller
        can switch on the matching config flags. Non-mergeable methods raise MicrotuneError.
        """
        self.require_mergeable()
        raise TypeError(f"{type(self).__name__} is mergeable, so it must override merge")

    @classmethod
    def require_mergeable(cls) -> None:
        """The one refusal for methods whose modules cannot fold into the base weights."""
        if not cls.mergeable:
            raise MicrotuneError(
                f"method '{cls.name}' cannot be merged: its modules cannot fold into the base "
                "weights; serve the artifact unmerged with `microtune eval` or the Python API"
            )

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
