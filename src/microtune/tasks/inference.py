"""Running a model over encoded rows for its outputs, in order: what evaluation, serving and
the export checks share, apart from the training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from microtune.common.progress import progress_bar
from microtune.tasks.data import Encoded, batches

# Model outputs of a split, in order: one (N, C) array for sequence types, one (T_i, C) array
# per example (its real tokens) for per-token types.
Outputs = np.ndarray | list[np.ndarray]
T = TypeVar("T")


@torch.no_grad()
def predict(
    model: nn.Module,
    rows: Sequence[Encoded],
    pad_token_id: int,
    batch_size: int = 64,
    progress: bool = False,
) -> Outputs:
    """Logits of every row, in order, with the model in eval mode: one (N, C) array, or for
    per-token outputs one (T_i, C) array per row (its real tokens, padding cut off).

    Rows are batched longest first (and put back in order), so little of a batch is padding.
    `progress`: a bar over the batches (`evaluation_batches`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return predict_with(
            lambda **inputs: model(**{k: v.to(device) for k, v in inputs.items()}),
            rows,
            pad_token_id,
            batch_size,
            progress,
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_with(
    forward: Callable[..., torch.Tensor],
    rows: Sequence[Encoded],
    pad_token_id: int,
    batch_size: int = 64,
    progress: bool = False,
) -> Outputs:
    """`predict` with any function of the padded inputs (an exported model: onnxruntime,
    sentence-transformers), batched the same way."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    dummy = [0] * len(rows)
    outputs = []
    every = batches(rows, dummy, batch_size, pad_token_id, order)
    for inputs, _ in evaluation_batches(every, len(rows), batch_size, progress):
        outputs.append(forward(**inputs).float().cpu())
    return join_outputs(outputs, rows, order)


def evaluation_batches(
    every: Iterable[T], rows: int, batch_size: int, progress: bool, desc: str = "evaluate"
) -> Iterator[T]:
    """The batches of an evaluation, under a progress bar over them when `progress` (the one
    bar of every evaluation: the end of training, `microtune eval`)."""
    with progress_bar(-(-rows // batch_size), desc, "batch", progress) as bar:
        for batch in every:
            yield batch
            bar.update(1)


def join_outputs(
    outputs: list[torch.Tensor], rows: Sequence[Encoded], order: Sequence[int] | None = None
) -> Outputs:
    """Batches of outputs (of the rows in `order`, default as stored) as `predict` returns
    them: back in row order, per-token outputs cut to each row's length."""
    order = list(range(len(rows))) if order is None else list(order)
    if outputs and outputs[0].dim() == 3:
        flat = [row for batch in outputs for row in batch]
        joined: list = [None] * len(rows)
        for index, output in zip(order, flat, strict=True):
            joined[index] = output[: len(rows[index]["input_ids"])].numpy()
        return joined
    logits = torch.cat(outputs)
    restored = torch.empty_like(logits)
    restored[torch.tensor(order)] = logits
    return restored.numpy()
