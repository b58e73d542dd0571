"""What every method is: a config dataclass and a module that attaches to a backbone.

The config (`MethodConfig`, re-exported here) lives in `microtune.methods.configs`, free of torch.

A method never reads the CLI and never sees the trainer. It gets a loaded `transformers`
backbone (frozen by `TaskModel` before `attach`) and the architecture map entry, adds its
parameters and hooks, and later folds itself back into the weights with `merge`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.common.records import Record
from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig


class Method(nn.Module, abc.ABC):
    """Base class of every fine-tuning method. Subclasses set the class attributes below."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # False for methods whose extra modules cannot fold into the base weights (adapters, prompts).
    mergeable: ClassVar[bool] = True
    # A learning rate that works for this method with AdamW on a GLUE task.
    default_learning_rate: ClassVar[float] = 1e-3
    # False for a method whose forward mixes the examples of a batch: no per-example gradient
    # exists, so DP training refuses it before the first step.
    supports_per_example: ClassVar[bool] = True
    # The record `stored_metadata` returns (the artifact's `method_state`); None: it records {}.
    state_schema: ClassVar[type[Record] | None] = None
    # How its tasks join a mixed batch of tasks on one shared base (`microtune.load_many`), one
    # of `JOINS`; `serving_join` reads it (a method whose answer depends on its options
    # overrides that instead).
    mixed_batch: ClassVar[str] = "copy"

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

    def per_example_parameters(
        self, batch_size: int
    ) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]] | None:
        """Optional fast path for DP: a context in which each of this method's trainable tensors
        is replaced by a per-example leaf of shape (batch_size, *shape) that row b of the batch
        alone uses; it yields the leaves by parameter name (e.g. {"z": z_b}). None (the
        default): DP uses the general `torch.func` path (`microtune.privacy.per_example`)."""
        return None

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

    # -- what the artifact stores: by default exactly what trains --------------------------

    def stored_state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors an artifact stores for this method, named as the caller likes to see them.

        Args:
            trainable: the task model's trainable tensors besides the head, by their names in
                `TaskModel.named_parameters()` (e.g. "method.z", "backbone.encoder...bias").

        The default stores them unchanged. A method that stores something else (PaFi's values
        without indices, HiWi's computed biases instead of its adapter) overrides this and
        `load_stored_state` together.
        """
        return dict(trainable)

    def stored_metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts the artifact records beside the tensors (e.g. a mask hash)."""
        return {}

    def load_stored_state(
        self,
        stored: dict[str, torch.Tensor],
        trainable: dict[str, torch.Tensor],
        metadata: dict[str, Any],
    ) -> None:
        """Put what `stored_state` wrote back into a freshly attached method.

        Args:
            stored: the artifact's tensors besides the head.
            trainable: the task model's trainable tensors besides the head (as `stored_state`).
            metadata: what `stored_metadata` returned at save time ({} for older artifacts).
        """
        copy_matching(stored, trainable)

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- serving in a mixed batch (`microtune.serving.multitask`) ----------------------------

    @classmethod
    def serving_join(cls, config: MethodConfig) -> str:
        """How a task of this method with these options joins a mixed batch (one of `JOINS`):

        - "bias": `merge` changes nothing but bias vectors; each row adds its task's changes.
        - "lora": each row adds x Aᵀ Bᵀ per target layer, from `low_rank_rows`.
        - "pafi": its rows run as their own group with `swapped_values` written into the base.
        - "copy" (the default): it cannot join; it is served on its own copy of the base.
        """
        return cls.mixed_batch

    def low_rank_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For a "lora" join: target path in the backbone -> (A (rank, in), scale·B (out,
        rank)), detached copies, so that the layer's update is x Aᵀ (scale·B)ᵀ."""
        raise TypeError(f"method '{self.name}' does not join mixed batches as low-rank rows")

    def swapped_values(self) -> SwappedValues:
        """For a "pafi" join: the values its rows' pass writes into the base, and how."""
        raise TypeError(f"method '{self.name}' does not join mixed batches as swapped values")


JOINS = ("bias", "lora", "pafi", "copy")


@dataclass(eq=False)
class SwappedValues:
    """What a "pafi" join gives the mixed batch: values written into the shared base's weights
    for its own rows' forward pass (`swap_in`), the originals written back after (`swap_out`).
    Tasks of one `group` (PaFi: one mask) hold the `shared` tensors once (`share`)."""

    group: str
    own: tuple[torch.Tensor, ...]  # held by this task alone (PaFi: its values)
    shared: tuple[torch.Tensor, ...]  # held once per group (PaFi: positions, original values)
    swap_in: Callable[[], object]
    swap_out: Callable[[], object]
    use_shared: Callable[[tuple[torch.Tensor, ...]], None]  # take the group's `shared` tensors

    def share(self, first: SwappedValues) -> None:
        """Use the `shared` tensors of the group's first task in place of this task's own."""
        self.use_shared(first.shared)
        self.shared = first.shared


def copy_matching(stored: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """Copy stored tensors into same-named targets; names and shapes must match one to one."""
    if set(stored) != set(targets):
        missing = sorted(set(targets) - set(stored))[:3]
        extra = sorted(set(stored) - set(targets))[:3]
        raise MicrotuneError(
            f"artifact tensors do not fit the model: missing {missing}, unexpected {extra}"
        )
    wrong = [n for n, t in targets.items() if tuple(stored[n].shape) != tuple(t.shape)]
    if wrong:
        name = wrong[0]
        raise MicrotuneError(
            f"artifact tensor {name} has shape {tuple(stored[name].shape)} but the model expects "
            f"{tuple(targets[name].shape)}; load it with the options it was trained with"
        )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(stored[name])
