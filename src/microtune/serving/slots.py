"""Per-task rows of one shared base, added per batch row by forward hooks (`load_many`).

A task of a mixed batch has a slot (0: the base itself). What each task changes sits as one row
of a stacked `SlotTable` per site, and `SiteRows` hooks the shared base so that, while
`rows_of` holds the batch's slots, every row of the batch adds its own task's rows:

- bias rows: what a task's merge changed in each bias of the base (one gather, one add);
- low-rank rows: A and scale·B per target layer, zero-padded to the largest rank (x Aᵀ Bᵀ per
  row with gathered factors and two batched matmuls: the Punica / S-LoRA scheme in plain torch).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from microtune.backbone.archspec import get_submodule, is_conv1d
from microtune.errors import MicrotuneError


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SlotTable:
    """Per-task rows of one site, gathered by each batch row's task slot. Row 0 is zeros (the
    base), so rows of tasks without an entry here add nothing. The table grows by doubling
    and a removed row is filled by the last one, so a thousand tasks cost a thousand rows and
    two index entries each, not a tensor (or a copy of the table) per task."""

    def __init__(self, like: torch.Tensor):
        self.table = torch.zeros((2, *like.shape), dtype=like.dtype, device=like.device)
        self.used = 1  # rows [0, used) are live; the rest is capacity, never gathered
        self.index = torch.zeros(0, dtype=torch.long, device=like.device)  # slot -> row (0: none)
        self.owner = torch.zeros(2, dtype=torch.long)  # row -> slot

    def __contains__(self, slot: int) -> bool:
        return slot < len(self.index) and bool(self.index[slot])

    def add(self, slot: int, value: torch.Tensor) -> None:
        if self.used == len(self.table):
            capacity = 2 * len(self.table)
            # Empty, not zeros: capacity rows are never read, so their pages stay untouched.
            grown = self.table.new_empty((capacity, *self.table.shape[1:]))
            grown[: self.used] = self.table[: self.used]
            self.table = grown
            self.owner = torch.cat([self.owner, self.owner.new_zeros(capacity - len(self.owner))])
        self.table[self.used] = value.to(self.table.dtype)
        self._fit(slot + 1)
        self.index[slot] = self.used
        self.owner[self.used] = slot
        self.used += 1

    def remove(self, slot: int) -> None:
        """Drop the slot's row; the last row moves into its place (its slot re-pointed)."""
        if slot not in self:
            return
        row, last = int(self.index[slot]), self.used - 1
        moved = int(self.owner[last])
        self.table[row] = self.table[last]
        self.owner[row] = moved
        self.index[moved] = row
        self.index[slot] = 0
        self.used -= 1

    def _fit(self, slots: int) -> None:
        """Grow the slot index (doubling, zeros: no row) to cover `slots` slots."""
        if len(self.index) < slots:
            grown = torch.zeros(max(slots, 2 * len(self.index)), dtype=torch.long)
            grown[: len(self.index)] = self.index
            self.index = grown.to(self.table.device)

    def gather(self, slots: torch.Tensor, size: int) -> torch.Tensor | None:
        """(B, *row) for the batch's slots (all below `size`); None when no row of the batch
        has an entry."""
        if self.used == 1:
            return None
        self._fit(size)
        rows = self.index[slots]
        if not bool(rows.any()):
            return None
        return self.table[rows]

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, *row) for slots that all have an entry (no check, no index growth)."""
        return self.table[self.index[slots]]

    def row_bytes(self, slot: int) -> int:
        return tensor_bytes([self.table[0]]) if slot in self else 0


@dataclass
class LowRankTable:
    """The low-rank tasks of one layer: A (N, r, in) and scale·B (N, out, r), zero-padded."""

    a: SlotTable | None = None
    b: SlotTable | None = None

    def add(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.a is None or self.b is None:
            self.a, self.b = SlotTable(a), SlotTable(b)
        rank = max(a.shape[0], self.a.table.shape[1])
        self.a.table = pad_dim(self.a.table, 1, rank)
        self.b.table = pad_dim(self.b.table, 2, rank)
        self.a.add(slot, pad_dim(a, 0, rank))
        self.b.add(slot, pad_dim(b, 1, rank))

    def remove(self, slot: int) -> None:
        if self.a is not None and self.b is not None:
            self.a.remove(slot)
            self.b.remove(slot)


def pad_dim(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad one dimension up to `size` (a zero rank adds exactly nothing)."""
    if tensor.shape[dim] >= size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


def bias_sites(body: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules whose bias is added last to their output (so a per-row bias is one add)."""
    for path, module in body.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) or is_conv1d(module):
            yield path, module


def check_rows(output: torch.Tensor, rows: torch.Tensor) -> None:
    if rows.shape[0] != 1 and output.shape[0] != rows.shape[0]:
        raise MicrotuneError(
            f"this base model packs the batch's tokens ({tuple(output.shape)}), so rows of "
            "different tasks cannot be told apart; serve its tasks with `microtune.load`"
        )


class SiteRows:
    """The bias rows and low-rank rows of every task on one shared base, and the forward hooks
    that add them for the batch's rows (`rows_of`)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.biases: dict[str, SlotTable] = {}  # path in `model` -> bias rows
        self.low_rank: dict[str, LowRankTable] = {}  # path in the task body -> factors
        self._hooked: set[str] = set()
        self._rows: torch.Tensor | None = None  # the current batch's task slots (B,) or (1,)
        self._size = 0  # every slot of the batch is below it
        # Every bias of the base as loaded (None: the layer has none), by path in `model`:
        # what each bias task's merge is compared against and restored to.
        self._originals = {
            path: (None if module.bias is None else module.bias.detach().clone())
            for path, module in bias_sites(model)
        }

    def take_merged_biases(self, slot: int) -> tuple[tuple[str, ...], int]:
        """A task was just merged into the shared base: keep each bias it changed as the slot's
        row, and put the base back bit for bit. Returns (its sites, the bytes of its rows)."""
        deltas = {}
        for path, module in bias_sites(self.model):
            original, current = self._originals.get(path), module.bias
            if current is None:
                continue
            with torch.no_grad():
                delta = current.detach() - (0 if original is None else original)
                if original is None:
                    module.bias = None  # a bias the merge created: the base had none
                else:
                    current.copy_(original)
            if bool(delta.any()):
                deltas[path] = delta
        held = 0
        for path, delta in deltas.items():
            self.biases.setdefault(path, SlotTable(delta)).add(slot, delta)
            self._hook(self.model, path, self._add_bias)
            held += self.biases[path].row_bytes(slot)
        return tuple(sys.intern(path) for path in deltas), held  # one string per site, shared

    def add_low_rank(
        self, slot: int, body: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[tuple[str, ...], int]:
        """The slot's (A, scale·B) per target path in `body`. Returns (its sites, bytes)."""
        held = 0
        for path, (a, b) in factors.items():
            target = self.low_rank.setdefault(path, LowRankTable())
            target.add(slot, a, b)
            self._hook(body, path, self._add_low_rank)
            assert target.a is not None and target.b is not None
            held += tensor_bytes([target.a.table[0]]) + tensor_bytes([target.b.table[0]])
        return tuple(sys.intern(path) for path in factors), held

    def remove(self, slot: int) -> None:
        for table in self.biases.values():
            table.remove(slot)
        for target in self.low_rank.values():
            target.remove(slot)

    def _hook(self, root: nn.Module, path: str, hook) -> None:
        key = f"{hook.__name__}:{path}"
        if key in self._hooked:
            return
        get_submodule(root, path).register_forward_hook(partial(hook, path))
        self._hooked.add(key)

    @contextlib.contextmanager
    def rows_of(self, slots: Sequence[int], size: int) -> Iterator[None]:
        """Within: every forward pass of the shared base adds the rows' own task updates (one
        slot: that task's, for batches of any size, as generation shrinks them); every slot
        is below `size`."""
        self._rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        self._size = size
        try:
            yield
        finally:
            self._rows = None

    # -- the per-row hooks --------------------------------------------------------------

    def _add_bias(self, path: str, module: nn.Module, inputs, output: torch.Tensor):
        if self._rows is None:
            return None
        shift = self.biases[path].gather(self._rows, self._size)
        if shift is None:
            return None
        check_rows(output, shift)
        shift = shift.view(shift.shape[0], *([1] * (output.dim() - 2)), shift.shape[-1])
        if not torch.is_grad_enabled() and shift.dtype == output.dtype:
            return output.add_(shift)  # the layer's own fresh output: no second tensor
        return (output + shift).to(output.dtype)

    def _add_low_rank(self, path: str, module: nn.Module, inputs, output: torch.Tensor):
        target = self.low_rank[path]
        if self._rows is None or target.a is None or target.b is None:
            return None
        a = target.a.gather(self._rows, self._size)
        b = target.b.gather(self._rows, self._size)
        if a is None or b is None:
            return None
        check_rows(output, a)
        x = inputs[0].to(a.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if a.shape[0] != flat.shape[0]:  # one task for the whole batch (generation)
            a, b = a.expand(flat.shape[0], -1, -1), b.expand(flat.shape[0], -1, -1)
        update = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return (output + update.view(output.shape)).to(output.dtype)
