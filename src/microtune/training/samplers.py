"""Samplers: which examples form each logical batch of the trainer, a pure function of the
sampler's seed and the epoch (so a resumed run replays exactly the batches of an uninterrupted
one)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from microtune.tasks.data import Encoded, epoch_order
from microtune.training.config import TrainConfig


class Sampler(Protocol):
    """Logical batches (lists of example indices) of one epoch: a pure function of the epoch
    and the sampler's seed, so a resumed run replays exactly the batches of an uninterrupted one."""

    @property
    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int) -> list[list[int]]: ...


@dataclass(frozen=True)
class ShuffledSampler:
    """The seeded epoch order (`data.epoch_order`) cut into batches of `batch_size`.

    Attributes:
        num_examples: size of the training set.
        batch_size: examples per logical batch.
        seed: seeds the order of every epoch.
        drop_last: drop each epoch's last, smaller batch (fixed-size batches).
    """

    num_examples: int
    batch_size: int
    seed: int
    drop_last: bool = False

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.num_examples // self.batch_size)
        return math.ceil(self.num_examples / self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        order = epoch_order(self.num_examples, self.seed, epoch)
        size = self.batch_size
        return [order[i * size : (i + 1) * size] for i in range(self.batches_per_epoch)]


@dataclass(frozen=True)
class LengthGroupedSampler:
    """Shuffled batches of examples of similar length, so little of each batch is padding.

    The seeded epoch order is cut into groups of `group_batches` batches; each group is sorted
    by length and cut into batches, and the batches of the epoch are shuffled (seeded). Every
    example still appears once per epoch and each batch is drawn from a random group of the
    data, as in the `group_by_length` of `transformers`' Trainer; on SST-2 a batch of 32 pads to
    a third of the tokens of a random one.

    Attributes:
        lengths: token count of every training example.
        batch_size: examples per logical batch.
        seed: seeds the order of every epoch.
        group_batches: batches per sorted group (larger: less padding, less randomness).
    """

    lengths: tuple[int, ...]
    batch_size: int
    seed: int
    group_batches: int = 50

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        order = epoch_order(len(self.lengths), self.seed, epoch)
        size, group = self.batch_size, self.batch_size * self.group_batches
        out = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: -self.lengths[i])
            out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        shuffle = epoch_order(len(out), self.seed + 1, epoch)
        return [out[i] for i in shuffle]


def default_sampler(config: TrainConfig, rows: Sequence[Encoded], processes: int = 1) -> Sampler:
    """Logical batches of batch_size * grad_accum per process: length-grouped unless switched
    off (each process's share of a length-grouped batch is length-grouped too)."""
    size = config.batch_size * config.grad_accum * processes
    if config.group_by_length:
        lengths = tuple(len(row["input_ids"]) for row in rows)
        return LengthGroupedSampler(lengths, size, config.seed)
    return ShuffledSampler(len(rows), size, config.seed)
