"""What every task type owns: the head's shape, encoding and labels, loss, predictions, metrics
and the stock export class. One subclass per type, one registry line in `__init__.py`.

The seam is shaped for per-token types too (token classification, causal LM): a type says
whether its outputs are per token (`per_token`: the model returns (B, T, C) and the labels are
one per token, -100 where nothing is scored) and turns whatever the model returns into
predictions and metrics itself. A type may also load the base with another `transformers` Auto
class and use its own head (`auto_class`, `backbone_and_head`: the causal LM's frozen LM head).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.tasks.data import Encoded
from microtune.tasks.heads import TaskHead
from microtune.tasks.inference import Outputs, predict
from microtune.tasks.spec import Example, Task, label_key, sentence_example


class TaskModelLike(Protocol):
    """What a task type needs of a task model (`microtune.model.TaskModel` is one): its parts,
    its forward pass (logits), the backbone's outputs before the head, and train/eval modes."""

    backbone: nn.Module
    head: nn.Module
    head_config: Any
    arch: Any
    method: Any
    mask_token_id: int | None
    training: bool

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...

    def backbone_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class TaskType(abc.ABC):
    """One kind of task: what the head computes and how it is trained, scored and exported.

    Attributes:
        name: the registry name, recorded in the artifact's task record as `type`.
        per_token: the head reads every token (read-out "tokens"), outputs are (B, T, C).
        stock_format: the export format written when a stock `transformers` class computes the
            same function (`export_stock`), e.g. "sequence-classification".
        auto_class: the `transformers` Auto class that loads the base model (`load_backbone`).
        export_check_examples: at most this many dev rows in the export check (None: no cap),
            for task types whose outputs are large (a causal LM's span its vocabulary).
        metrics: every metric name a task of this type may record (the artifact schema
            accepts these in a task record).
        stock_class: the `transformers` Auto class that loads a `stock_format` export.
    """

    name: ClassVar[str]
    per_token: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ()
    stock_format: ClassVar[str | None] = None
    stock_class: ClassVar[str | None] = None
    auto_class: ClassVar[str] = "AutoModel"
    export_check_examples: ClassVar[int | None] = None

    def backbone_and_head(self, model: nn.Module, head_config: Any) -> tuple[nn.Module, nn.Module]:
        """(backbone, head) of a model loaded with `auto_class`: by default the model itself
        and a new linear `TaskHead` over the read-out (`HeadConfig`)."""
        head = TaskHead(
            model.config.hidden_size,
            head_config.num_labels,
            head_config.head_dropout,
            bias=head_config.bias,
        )
        return model, head

    def fit_rows(self, task: Task, rows: Sequence[dict], text_columns: tuple[str, ...] | None):
        """The task as its training rows shape it, for types whose data comes in more than one
        shape (the causal LM: prompt/response or text); by default the task as it is."""
        return task

    def read_example(
        self, task: Task, row: dict, columns: tuple[str, ...], label_column: str, where: str
    ) -> Example:
        """One example from a data row whose columns are known to be present (`where` names
        the row in errors)."""
        return sentence_example(task, row, columns, label_column, where)

    def seen_labels(self, rows: Sequence[dict], column: str, source: str) -> set[str]:
        """The label names that occur in training rows (for tasks whose labels come from the
        data)."""
        return {
            label_key(row.get(column), f"{source}, row {number}")
            for number, row in enumerate(rows, 1)
        }

    def order_labels(self, seen: set[str]) -> list[str]:
        """The label set's order when --labels does not fix it: whole numbers numerically,
        otherwise sorted text."""
        if all(name.lstrip("-").isdigit() for name in seen):
            return sorted(seen, key=int)
        return sorted(seen)

    def readout(self, requested: str | None, default: str) -> str:
        """The read-out the head uses (`requested` by the user, else `default`)."""
        return requested or default

    def default_head_bias(self, readout: str, causal: bool) -> bool:
        """Whether the head has a bias when the user does not say (`--head-bias`)."""
        return True

    @abc.abstractmethod
    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        max_length: int,
        readout: str = "",
    ) -> tuple[list[Encoded], list]:
        """(token rows, training labels) of the examples, in order, as a model with this
        read-out reads them (the mask read-out needs the tokenizer's mask token in each row).
        A task model's own is `TaskModel.encode`."""

    @abc.abstractmethod
    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The training loss; `reduction="none"` gives one loss per example (DP-SGD)."""

    def loss_units(self, labels: torch.Tensor) -> int:
        """How many things `loss` (reduction "mean") averages over in this batch: examples by
        default. The trainer weighs each micro-batch (and each process's share) by it, so a
        logical batch's loss is the same however it is cut."""
        return len(labels)

    def evaluate(
        self,
        model: TaskModelLike,
        task: Task,
        rows: Sequence[Encoded],
        labels: Sequence,
        pad_token_id: int,
        batch_size: int = 64,
        tokenizer: Any = None,
        *,
        progress: bool = False,
        breakdown: bool = False,
    ) -> dict[str, Any]:
        """The dev metrics of `model` on encoded rows: `score` of `predict`'s outputs, which
        must be finite, with a progress bar over the batches when `progress`, and the type's
        `breakdown` added when asked. Types whose outputs are too large to hold (a vocabulary
        per token) or that generate override it (`tokenizer`: for those that read text back)."""
        outputs = predict(model, rows, pad_token_id, batch_size, progress)
        each = outputs if isinstance(outputs, list) else list(outputs)
        bad = sum(not np.isfinite(o).all() for o in each)
        if bad:
            raise MicrotuneError(
                f"the model's outputs are not finite on {bad} of {len(rows)} evaluation examples, "
                "so nothing can be scored; check the artifact's tensors, or use a wider --dtype"
            )
        metrics: dict[str, Any] = dict(self.score(task, outputs, labels))
        return {**metrics, **self.breakdown(task, outputs, labels)} if breakdown else metrics

    @abc.abstractmethod
    def score(self, task: Task, outputs: Outputs, labels: Sequence) -> dict[str, float | None]:
        """The task's dev metrics of the model's outputs against the encoded labels."""

    def breakdown(self, task: Task, outputs: Outputs, labels: Sequence) -> dict[str, Any]:
        """What `microtune eval` reports beside the metrics (classification: per-class numbers
        and the confusion matrix); nothing by default."""
        return {}

    @abc.abstractmethod
    def present(
        self,
        outputs: Outputs,
        label_names: Sequence[str],
        examples: Sequence[Example],
        labels: Sequence,
    ) -> list[dict[str, Any]]:
        """One JSON-able prediction per input (what `microtune predict` prints); `labels` are
        the encoded placeholders of the inputs (where per-token types read their words)."""

    def check_ranks(self) -> None:
        """Refuse `rank` before any work where the type has no one distribution over labels
        per input (only classification has)."""
        raise MicrotuneError(f"a {self.name} task has no labels to rank (classification has)")

    def rank(
        self, outputs: Outputs, label_names: Sequence[str], k: int
    ) -> list[list[dict[str, Any]]]:
        """Per input, its `k` most probable labels, {"label", "score"} each, best first (the
        server's `top_k`)."""
        self.check_ranks()
        raise NotImplementedError(f"{type(self).__name__}.rank")

    def check_predicts(self) -> None:  # noqa: B027 (a hook: most types predict)
        """Refuse `predict` before any work where the type has no labels to present (a causal
        LM generates instead)."""

    def check_generates(self) -> None:
        """Refuse `generate` before any work where the type does not generate text."""
        raise MicrotuneError(
            f"generate needs a causal-lm artifact; this one is {self.name}: use predict"
        )

    def generate(
        self,
        task_model: TaskModelLike,
        tokenizer: Any,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        max_length: int,
    ) -> list[dict[str, Any]]:
        """One {"prompt", "response"} per prompt, for types that generate text."""
        self.check_generates()
        return []

    def export_stock(self, task_model: TaskModelLike, config: dict[str, Any], folder) -> bool:
        """Write a stock `transformers` task model into `folder` when one computes the same
        function as `task_model` (merged); False (nothing written) when none does."""
        return False


def stock_model_like(full: nn.Module, task_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A freshly built stock model in the base's precision (a stock model has one dtype) and on
    the task model's device, in eval mode: ready for the same-function probe."""
    return full.to(device=next(task_model.parameters()).device, dtype=dtype).eval()


def own_linear(full: nn.Module) -> nn.Linear | None:
    """The stock model's one layer with parameters outside its backbone, if it is a linear."""
    own = [
        module
        for name, module in full.named_modules()
        if not name.startswith(full.base_model_prefix)
        and any(True for _ in module.parameters(recurse=False))
    ]
    return own[0] if len(own) == 1 and isinstance(own[0], nn.Linear) else None
