"""Tokenising examples once, and cutting them into padded batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from microtune.errors import MicrotuneError
from microtune.tasks.spec import Example

Encoded = dict[str, list[int]]

# Label of a position that is not scored (special tokens, a word's later sub-tokens, padding),
# as `torch.nn.functional.cross_entropy` and `transformers` ignore it.
IGNORE_INDEX = -100


def encode(
    tokenizer,
    examples: Sequence[Example],
    max_length: int = 128,
    add_mask_token: bool = False,
) -> list[Encoded]:
    """Token ids (and attention mask, token types where the model uses them) per example.

    With `add_mask_token`, the tokenizer's mask token is appended to the first sentence, after
    truncation, so it always survives (the mask read-out of SLaSh and JR-WARP).
    """
    if add_mask_token and tokenizer.mask_token_id is None:
        raise MicrotuneError("the mask read-out needs a tokenizer with a mask token")
    firsts = [e.texts[0] for e in examples]
    seconds = [e.texts[1] for e in examples] if len(examples[0].texts) > 1 else None
    batch = tokenizer(
        firsts,
        seconds,
        truncation=True,
        max_length=max_length - int(add_mask_token),
        return_attention_mask=True,
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    rows = [{k: list(batch[k][i]) for k in keys} for i in range(len(examples))]
    if add_mask_token:
        for row in rows:
            _insert_mask(row, tokenizer)
    return rows


def _insert_mask(row: Encoded, tokenizer) -> None:
    """Put the mask token at the end of the first segment (before its separator, if any)."""
    ids = row["input_ids"]
    sep = tokenizer.sep_token_id
    position = ids.index(sep) if sep is not None and sep in ids else len(ids)
    ids.insert(position, tokenizer.mask_token_id)
    row["attention_mask"].insert(position, 1)
    if "token_type_ids" in row:
        row["token_type_ids"].insert(position, row["token_type_ids"][max(position - 1, 0)])


def collate(rows: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows to the longest one."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in rows[0]:
        pad = pad_token_id if key == "input_ids" else 0
        out[key] = torch.tensor([r[key] + [pad] * (width - len(r[key])) for r in rows])
    return out


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a pure function of (seed, epoch), so resuming mid-epoch
    replays exactly the batches an uninterrupted run would see."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def batches(
    rows: Sequence[Encoded],
    labels: Sequence[float | int],
    batch_size: int,
    pad_token_id: int,
    order: Sequence[int] | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(inputs, labels) batches in the given order (default: as stored). Per-token labels
    (a list per row) are right-padded like the inputs, with -100 (not scored)."""
    order = range(len(rows)) if order is None else order
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        inputs = collate([rows[i] for i in index], pad_token_id)
        yield inputs, collate_labels([labels[i] for i in index], inputs["input_ids"].shape[1])


def collate_labels(labels: Sequence, width: int) -> torch.Tensor:
    """Labels of a batch: class indices (long), numbers (float32), or per-token lists padded
    to `width` with -100."""
    if isinstance(labels[0], (list, tuple)):
        return torch.tensor([list(row) + [IGNORE_INDEX] * (width - len(row)) for row in labels])
    regression = isinstance(labels[0], float)
    return torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
