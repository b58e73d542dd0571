"""The task-type registry: name → `TaskType`. Adding a type: one module, one line here."""

from __future__ import annotations

from typing import Any

from microtune.errors import MicrotuneError
from microtune.tasktypes.base import IGNORE_INDEX, Outputs, TaskType
from microtune.tasktypes.causal import CausalLM
from microtune.tasktypes.sequence import Regression, SequenceClassification
from microtune.tasktypes.tokens import TokenClassification, align_labels

TASK_TYPES: dict[str, TaskType] = {
    t.name: t for t in (SequenceClassification(), Regression(), TokenClassification(), CausalLM())
}
# Export formats of stock `transformers` classes: format → the Auto class that loads it.
STOCK_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}


def get_task_type(name: str) -> TaskType:
    try:
        return TASK_TYPES[name]
    except KeyError:
        raise MicrotuneError(
            f"task type '{name}' is unknown; available: {', '.join(TASK_TYPES)}"
        ) from None


def task_type_of(record: dict[str, Any]) -> TaskType:
    """The type of an artifact's task record; older records name none: regression for one
    label, else classification."""
    name = record.get("type") or ("regression" if record["num_labels"] == 1 else "classification")
    return get_task_type(name)


__all__ = [
    "IGNORE_INDEX",
    "STOCK_CLASSES",
    "TASK_TYPES",
    "Outputs",
    "TaskType",
    "align_labels",
    "get_task_type",
    "task_type_of",
]
