"""The task-type registry: name → `TaskType`. Adding a type: one module, one line here (or one
`register_task_type` call from outside the package).

Everything the rest of the library asks of "the type of this task" goes through here: the
type of a task or an artifact's task record, the loss a model trains with, the stock classes
exports load with, and the metric names task records may hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.tasks.spec import TASKS, Task, register_task
from microtune.tasks.types.base import TaskModelLike, TaskType
from microtune.tasks.types.causal import CausalLM
from microtune.tasks.types.sequence import Regression, SequenceClassification
from microtune.tasks.types.tokens import TokenClassification, align_labels

TASK_TYPES: dict[str, TaskType] = {
    t.name: t for t in (SequenceClassification(), Regression(), TokenClassification(), CausalLM())
}


def register_task_type(task_type: TaskType, *tasks: Task) -> TaskType:
    """Add a task type under its name, with the named tasks of that type it offers (`--task`
    names, `taskspec.TASKS`); a name already taken is refused. Returns the type.

    The built-in types' tasks are listed in `taskspec.TASKS` itself, which imports no torch, so
    that the command line offers them without loading the task types."""
    if task_type.name in TASK_TYPES:
        raise MicrotuneError(f"task type '{task_type.name}' is already registered")
    wrong = [task.name for task in tasks if task.type != task_type.name]
    if wrong:
        raise MicrotuneError(f"task(s) {wrong} are not of type '{task_type.name}'")
    TASK_TYPES[task_type.name] = task_type
    for task in tasks:
        register_task(task)
    return task_type


def unregister_task_type(name: str) -> None:
    """Remove a task type and its named tasks (tests that register toys clean up with it)."""
    TASK_TYPES.pop(name, None)
    for task_name in [n for n, task in TASKS.items() if task.type == name]:
        del TASKS[task_name]


def get_task_type(name: str) -> TaskType:
    try:
        return TASK_TYPES[name]
    except KeyError:
        raise MicrotuneError(
            f"task type '{name}' is unknown; available: {', '.join(TASK_TYPES)}"
        ) from None


def type_of(task: Task) -> TaskType:
    """The `TaskType` that trains, scores and exports this task."""
    return get_task_type(task.type)


def task_type_of(record: dict[str, Any]) -> TaskType:
    """The type of an artifact's task record; older records name none: regression for one
    label, else classification."""
    name = record.get("type") or ("regression" if record["num_labels"] == 1 else "classification")
    return get_task_type(name)


def stock_classes() -> dict[str, str]:
    """Export formats of stock `transformers` classes: format → the Auto class that loads it."""
    return {t.stock_format: t.stock_class for t in TASK_TYPES.values() if t.stock_class}


def recorded_metrics() -> tuple[str, ...]:
    """Every metric name a registered task type may record, in registry order."""
    return tuple(dict.fromkeys(name for t in TASK_TYPES.values() for name in t.metrics))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The sentence-level loss by output width: cross-entropy for classes, MSE for one-output
    regression (STS-B). Models that know their task type use theirs (`loss_for`)."""
    kind = "regression" if logits.shape[-1] == 1 else "classification"
    return get_task_type(kind).loss(logits, labels, reduction)


def loss_for(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The model's own loss (`TaskModel.loss`: its task type's), else `loss_fn`."""
    return getattr(model, "loss", loss_fn)


def loss_units_for(model: nn.Module) -> Callable[[torch.Tensor], int]:
    """What the model's loss averages over in a batch (`TaskType.loss_units`); examples for a
    model without a task type (`loss_fn`'s sentence-level losses)."""
    task_type = getattr(model, "task_type", None)
    return task_type.loss_units if task_type is not None else len


__all__ = [
    "TASK_TYPES",
    "TaskModelLike",
    "TaskType",
    "align_labels",
    "get_task_type",
    "loss_fn",
    "loss_for",
    "loss_units_for",
    "recorded_metrics",
    "register_task_type",
    "stock_classes",
    "task_type_of",
    "type_of",
    "unregister_task_type",
]
