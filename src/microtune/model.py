"""The task model: a loaded base model (`microtune.backbone.load`) wrapped as backbone + method +
read-out + head, and folded back into a stock backbone by `merge`."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec, arch_for, get_submodule
from microtune.errors import MicrotuneError
from microtune.methods.base import Method, copy_matching
from microtune.tasks.heads import READOUTS, read_out
from microtune.tasks.spec import Example
from microtune.tasks.types import TaskType, get_task_type


@dataclass
class HeadConfig:
    """How the task model reads the backbone: the read-out and the head's shape.

    Attributes:
        num_labels: outputs of the head (1 for regression).
        readout: which hidden state(s) the head reads (`microtune.tasks.heads.READOUTS`).
        head_dropout: dropout before the head's linear layer.
        bias: the head's linear has a bias (artifacts from before this field have one). The
            stock decoder `...ForSequenceClassification` classes have none, so a decoder's
            sentence head trains without one by default (`TaskType.default_head_bias`).
    """

    num_labels: int
    readout: str = "mean"
    head_dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise MicrotuneError(f"read-out '{self.readout}' is unknown; use one of {READOUTS}")
        if not 0 <= self.head_dropout < 1:
            raise MicrotuneError(f"--head-dropout must be in [0, 1), got {self.head_dropout}")
        if self.num_labels < 1:
            raise MicrotuneError(f"num_labels must be at least 1, got {self.num_labels}")


def default_task_type(head_config: HeadConfig) -> TaskType:
    """The task type a head implies when none is named (older artifacts): per token for the
    "tokens" read-out, regression for one output, else classification."""
    if head_config.readout == "tokens":
        return get_task_type("token-classification")
    return get_task_type("regression" if head_config.num_labels == 1 else "classification")


class TaskModel(nn.Module):
    """A frozen backbone, one attached method, a read-out and a trainable head.

    `forward` returns logits (B, num_labels), or (B, T, num_labels) for per-token task types;
    for regression num_labels is 1. `loss` is the task type's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_config: HeadConfig,
        method: Method | None = None,
        mask_token_id: int | None = None,
        task_type: TaskType | None = None,
    ):
        super().__init__()
        self.task_type = task_type or default_task_type(head_config)
        # The type's split: a new TaskHead, or (causal LM) the model's own frozen LM head.
        backbone, head = self.task_type.backbone_and_head(backbone, head_config)
        self.backbone = backbone  # registered before the head: a tied weight is named here
        self.arch: ArchSpec = arch_for(backbone)
        self.head_config = head_config
        # The type checks the read-out (per-token types need "tokens", the others refuse it).
        self.task_type.readout(head_config.readout, head_config.readout)
        self.mask_token_id = mask_token_id
        if head_config.readout == "pooler" and self.arch.pooler is None:
            raise MicrotuneError(
                f"{backbone.config.model_type} has no pooler; use --readout first or mean"
            )
        if head_config.readout == "mask" and mask_token_id is None:
            raise MicrotuneError("the mask read-out needs a tokenizer with a mask token")
        self.head = head
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        self.method = method
        if method is not None:
            method.attach(backbone, self.arch)
        self.head.to(next(backbone.parameters()).device)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The task type's training loss (`reduction="none"`: one per example)."""
        return self.task_type.loss(logits, labels, reduction)

    def encode(self, tokenizer: Any, examples: Sequence[Example], max_length: int):
        """(token rows, training labels) of examples as this model reads them (its task type's
        encoding for its read-out)."""
        return self.task_type.encode(tokenizer, examples, max_length, self.head_config.readout)

    @property
    def backbone_dropout(self) -> bool:
        return self.method is None or self.method.config.dropout

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if not self.backbone_dropout:
            # Frozen transformer blocks have no train-mode behaviour other than dropout.
            self.backbone.eval()
        return self

    def backbone_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        """The backbone's outputs with the method applied (`last_hidden_state` (B, T, D)), before
        read-out and head: what generation reads at chosen positions."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.arch.token_type_ids:
            inputs["token_type_ids"] = token_type_ids
        if self.method is not None:
            return self.method.run_backbone(self.backbone, **inputs)
        return self.backbone(**inputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        outputs = self.backbone_outputs(input_ids, attention_mask, token_type_ids)
        features = read_out(
            self.head_config.readout,
            outputs.last_hidden_state,
            attention_mask,
            input_ids,
            mask_token_id=self.mask_token_id,
            pooled=getattr(outputs, "pooler_output", None),
        )
        return self.head(features.to(self.head.linear.weight.dtype))

    @contextlib.contextmanager
    def per_example_parameters(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Per-example leaves (B, *shape) for the head and, where the method offers a fast path
        (`Method.per_example_parameters`), the method's tensors, by their names here. DP uses
        this path only when the leaves cover every trainable tensor (`privacy.per_example`)."""
        with contextlib.ExitStack() as stack:
            head = stack.enter_context(self.head.per_example_parameters(batch_size))
            leaves = {f"head.linear.{name}": leaf for name, leaf in head.items()}
            offer = self.method.per_example_parameters(batch_size) if self.method else None
            if offer is not None:
                own = stack.enter_context(offer)
                leaves.update({f"method.{name}": leaf for name, leaf in own.items()})
            yield leaves

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every parameter that trains, by its name in this module: what an artifact stores."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def count_trainable(self) -> dict[str, int]:
        """Numbers that train, split into head and method (what the optimizer updates)."""
        return count_numbers(self.trainable_state())

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What an artifact stores: the head's tensors plus what the method chooses to store
        from its trainable tensors (by default exactly those, see `Method.stored_state`)."""
        trainable = self.trainable_state()
        head = {n: t for n, t in trainable.items() if n.startswith("head.")}
        rest = {n: t for n, t in trainable.items() if not n.startswith("head.")}
        if self.method is None:
            return {**head, **rest}
        return {**head, **self.method.stored_state(rest)}

    def count_stored(self) -> dict[str, int]:
        """Numbers an artifact stores, split as `count_trainable` (HiWi stores fewer)."""
        return count_numbers(self.stored_state())

    def load_stored_state(
        self, stored: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
    ) -> None:
        """Inverse of `stored_state`: the head is copied, the rest goes to the method."""
        trainable = self.trainable_state()
        head = {n: t for n, t in trainable.items() if n.startswith("head.")}
        copy_matching({n: t for n, t in stored.items() if n.startswith("head.")}, head)
        rest_stored = {n: t for n, t in stored.items() if not n.startswith("head.")}
        rest = {n: t for n, t in trainable.items() if not n.startswith("head.")}
        if self.method is None:
            copy_matching(rest_stored, rest)
        else:
            self.method.load_stored_state(rest_stored, rest, metadata or {})

    @torch.no_grad()
    def merge(self) -> TaskModel:
        """Fold the method into the backbone's weights; the backbone is then plain transformers."""
        if self.method is not None:
            created = self.method.merge(self.backbone, self.arch)
            if created:
                self.backbone = with_bias_flags(self.backbone, self.arch, created)
            self.method = None
        return self


def with_bias_flags(backbone: nn.Module, arch: ArchSpec, parts: list[str]) -> nn.Module:
    """Switch on the config flags for biases a merge created, and add the zero biases the flag
    implies on sibling layers, so the backbone equals a stock model built from its config."""
    missing = [part for part in parts if part not in arch.bias_flags]
    if missing:
        raise MicrotuneError(
            f"cannot export: no config flag for created biases at {missing}; serve the artifact "
            "unmerged (`microtune eval`, `microtune.load`)"
        )
    flags = {arch.bias_flags[part] for part in parts}
    config = copy.deepcopy(backbone.config)
    for flag in flags:
        setattr(config, flag, True)
    with torch.device("meta"):
        reference = type(backbone)(config)
    present = dict(backbone.named_parameters())
    for name, parameter in reference.named_parameters():
        if name in present:
            continue
        if not name.endswith(".bias"):
            raise MicrotuneError(f"cannot export: unexpected parameter {name} after merge")
        owner = get_submodule(backbone, name.rsplit(".", 1)[0])
        like = owner.weight
        owner.bias = nn.Parameter(
            torch.zeros(parameter.shape, dtype=like.dtype, device=like.device),
            requires_grad=False,
        )
    backbone.config = config
    return backbone


def count_numbers(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Element counts split into "head" (names starting "head.") and "method", plus "total"."""
    counts = {"head": 0, "method": 0}
    for name, tensor in tensors.items():
        counts["head" if name.startswith("head.") else "method"] += tensor.numel()
    counts["total"] = counts["head"] + counts["method"]
    return counts
