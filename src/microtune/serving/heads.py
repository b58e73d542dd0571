"""Task heads of a mixed batch (`load_many`): each row read out and classified by its own task.

Rows whose tasks read out the same way and have linear heads of one shape share a head family:
the heads' weights and biases are rows of the family's `SlotTable`s, gathered per batch row
for one batched matmul (as per-row heads in S-LoRA). Any other task keeps its own head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from microtune.serving.slots import SlotTable
from microtune.tasks.heads import TaskHead, read_out


def head_family(model: nn.Module) -> tuple:
    """Tasks with one key can share a batched head (and one head table): a sequence read-out
    and a linear head of one shape; any other task (per token, an LM head) keeps its own."""
    head = getattr(model.head, "linear", None)
    if model.head_config.readout == "tokens" or not isinstance(model.head, TaskHead):
        return ("own",)
    return ("rows", model.head_config.readout, tuple(head.weight.shape), head.bias is None)


def task_features(model: nn.Module, hidden, pooled, inputs, positions: list[int]):
    """A task model's read-out on its rows of the batch (as `TaskModel.forward`)."""
    index = torch.tensor(positions, device=hidden.device)
    return read_out(
        model.head_config.readout,
        hidden[index],
        inputs["attention_mask"][index],
        inputs["input_ids"][index],
        mask_token_id=model.mask_token_id,
        pooled=None if pooled is None else pooled[index],
    )


class HeadTables:
    """Per head family (`head_family`), the linear heads' weights and biases as table rows."""

    def __init__(self) -> None:
        self.families: dict[tuple, tuple[SlotTable, SlotTable | None]] = {}  # family -> W, b

    def add(self, family: tuple, slot: int, linear: nn.Linear) -> None:
        if family not in self.families:
            bias = None if linear.bias is None else SlotTable(linear.bias.detach())
            self.families[family] = (SlotTable(linear.weight.detach()), bias)
        weights, biases = self.families[family]
        weights.add(slot, linear.weight.detach())
        if biases is not None:
            biases.add(slot, linear.bias.detach())

    def remove(self, slot: int) -> None:
        for weights, biases in self.families.values():
            for table in (weights, biases):
                if table is not None:
                    table.remove(slot)

    def read_rows(self, members: list, hidden, pooled, inputs) -> dict[tuple[int, int], Any]:
        """Each (request, index, task, row) member of one forward pass read out and through its
        own task's head: rows whose heads read the same way and have one shape share one
        batched head. {(request, index): its outputs as a numpy array}."""
        families: dict[tuple, list[int]] = {}
        for position, member in enumerate(members):
            task = member[2]
            families.setdefault(task.head_key or ("own", task.name), []).append(position)
        found = {}
        for positions in families.values():
            tasks = [members[p][2] for p in positions]
            logits = self.head_outputs(tasks, hidden, pooled, inputs, positions)
            for position, output in zip(positions, logits, strict=True):
                r, i, _, row = members[position]
                output = output.float().cpu()
                found[(r, i)] = (
                    output[: len(row["input_ids"])] if output.dim() == 2 else output
                ).numpy()
        return found

    def head_outputs(self, tasks: list, hidden, pooled, inputs, positions: list[int]):
        """Each row's own head on its features: tasks of one head table gather their rows'
        weights (B, C, D) for one batched matmul (as per-row heads in S-LoRA); a task with a
        head of its own (all `tasks` the same) runs it."""
        model = tasks[0].tuned.task_model
        features = task_features(model, hidden, pooled, inputs, positions)
        if tasks[0].head_key is None:
            return model.head(features.to(model.head.linear.weight.dtype))
        slots = torch.tensor([task.slot for task in tasks], device=hidden.device)
        weights, biases = self.families[tasks[0].head_key]
        weight = weights.rows(slots)
        out = torch.bmm(weight, features.to(weight.dtype)[:, :, None])[:, :, 0]
        if biases is not None:
            out = out + biases.rows(slots)
        return out
