"""Many tasks on one base model, in one batch: `microtune.load_many`.

One base model sits in memory; each task artifact on it (fingerprints checked by
`load_artifact`, onto the loaded base) keeps only what differs from the base, and one forward
pass serves a batch whose rows belong to different tasks:

- "bias" tasks (SLaSh at any position, BitFit, HiWi's bias variant, the linear probe): merged,
  they differ from the base only in bias vectors, so the loader merges the task into the
  shared base, keeps the per-site differences as one row of that site's task table, and puts
  the base back bit for bit. A forward hook on each site adds every row's own bias row (one
  gather, one add); a linear probe has no row at all.
- "lora" tasks: each target keeps the tasks' A and scale·B stacked (zero-padded to the largest
  rank); a hook adds x Aᵀ Bᵀ per row with gathered factors and two batched matmuls (the
  Punica / S-LoRA scheme in plain torch).
- "pafi" tasks: the k values of one shared mask; the task's rows run as their own group with
  the values written into the base weights (`PaFi.merge`, O(k)) and the originals written back
  after (`PaFi.unmerge`). Tasks on the same mask share its positions and original values.
- every other method ("copy": prompts, full fine-tuning, dense weight methods) cannot join a
  mixed batch: it gets its own copy of the base (merged where it can be) only within
  `max_copy_bytes`, else loading refuses it in one line naming the cap.

Each row is read out by its own task's read-out and head. `predict` returns, per request,
what `TunedModel.predict` returns for that task; `generate` serves causal-lm tasks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microtune.archspec import get_submodule, is_conv1d
from microtune.artifact import LoadedBase, load_artifact, read_artifact_config
from microtune.backbone import fingerprint, load_backbone, resolve_device, tokenizer_fingerprint
from microtune.data import Encoded, collate
from microtune.errors import MicrotuneError
from microtune.heads import TaskHead, read_out
from microtune.methods.lora import LoRA
from microtune.methods.pafi import PaFi
from microtune.serving import Input, TunedModel
from microtune.taskspec import Example
from microtune.tasktypes import task_type_of

KINDS = ("bias", "lora", "pafi", "copy")
BIAS_METHODS = ("slash", "bitfit", "linear")


def join_kind(config: Mapping[str, Any]) -> str:
    """How an artifact joins a mixed batch: "bias", "lora", "pafi", or "copy" (it cannot)."""
    method = config["method"]
    if method in BIAS_METHODS:
        return "bias"
    if method == "hiwi" and config.get("method_config", {}).get("variant", "bias") == "bias":
        return "bias"
    if method in ("lora", "pafi"):
        return method
    return "copy"


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

    def row_bytes(self, slot: int) -> int:
        return tensor_bytes([self.table[0]]) if slot in self else 0


@dataclass
class LoRATarget:
    """The LoRA tasks of one layer: A (N, r, in) and scale·B (N, out, r), zero-padded."""

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


def pad_dim(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad one dimension up to `size` (a zero rank adds exactly nothing)."""
    if tensor.shape[dim] >= size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


@dataclass(eq=False, slots=True)
class ResidentTask:
    """One task of the multi-task model: a light record, its tensors in the engine's tables.

    `tuned` gives the task's read-out, task type and label names: for a "bias" or "lora" task
    with a linear head it is a view shared by every task with the same task record (its head
    unused: this task's head weights are rows of the engine's head table `head_key`); else the
    task's own `TunedModel` (its head; its own base copy for "copy" tasks; `pafi` holds the
    PaFi method whose values swap in)."""

    name: str
    slot: int
    kind: str
    tuned: TunedModel
    artifact_bytes: int
    resident_bytes: int = 0
    pafi: PaFi | None = None
    sites: tuple[str, ...] = ()
    head_key: tuple | None = None

    @property
    def method(self) -> str:
        return self.tuned.config["method"]


@dataclass
class EncodedRequest:
    """One request's inputs checked and tokenised for its task (so a bad input fails before
    it joins a batch)."""

    task: str
    examples: list[Example]
    rows: list[Encoded]
    labels: list[Any]


class MultiTaskModel:
    """One base model and any number of tasks on it; mixed-task batches in one forward pass.

    Thread-safe: loading, removing and running take one lock (a server runs batches from one
    worker thread and hot-loads between them)."""

    def __init__(
        self,
        base: LoadedBase,
        device: torch.device,
        max_copy_bytes: int = 0,
        model_name: str | None = None,
    ):
        self.base = base
        self.model_name = model_name  # where copies load the base from (None: the artifact's)
        self.device = device
        self.max_copy_bytes = max_copy_bytes
        self.tasks: dict[str, ResidentTask] = {}
        self.lock = threading.RLock()
        # A fast tokenizer refuses two threads at once ("Already borrowed": truncation settings
        # change per task), so encoding (any thread) and generation take this one.
        self.tokenizer_lock = threading.Lock()
        self._next_slot = 1  # slot 0: the base itself
        self._rows: torch.Tensor | None = None  # the current batch's task slots (B,) or (1,)
        self._biases: dict[str, SlotTable] = {}
        self._loras: dict[str, LoRATarget] = {}
        self._hooked: set[str] = set()
        self._pafi_shared: dict[str, PaFi] = {}  # mask fingerprint -> first task's method
        self._heads: dict[tuple, tuple[SlotTable, SlotTable | None]] = {}  # family -> W, b
        self._views: dict[str, TunedModel] = {}  # task record -> the view its tasks share
        self.body: nn.Module | None = None  # the part of the base the tasks' heads read
        # Every bias of the base as loaded (None: the layer has none), by path in base.model:
        # what each bias task's merge is compared against and restored to.
        self._originals = {
            path: (None if module.bias is None else module.bias.detach().clone())
            for path, module in bias_sites(base.model)
        }

    # -- loading ------------------------------------------------------------------------

    def add(
        self, artifact: str | os.PathLike, name: str | None = None, copy: bool = False
    ) -> ResidentTask:
        """Load one artifact onto the base as task `name` (default: the folder's name);
        `copy`: as its own merged copy of the base (within `max_copy_bytes`) even if it could
        join the mixed batch."""
        name = name or Path(artifact).resolve().name
        with self.lock:
            if name in self.tasks:
                raise MicrotuneError(f"task '{name}' is already loaded; delete it first")
            config = read_artifact_config(artifact)
            kind = "copy" if copy else join_kind(config)
            if kind == "copy":
                return self._add_copy(artifact, name, config)
            task_model, _, config = load_artifact(artifact, base_model=self.base)
            task = ResidentTask(
                name,
                self._next_slot,
                kind,
                TunedModel(task_model, self.base.tokenizer, config, artifact),
                artifact_bytes=tensor_bytes(list(task_model.stored_state().values())),
            )
            self._check_body(task_model.backbone)
            try:
                {"bias": self._take_biases, "lora": self._take_lora, "pafi": self._take_pafi}[kind](
                    task
                )
            finally:
                for parameter in self.base.model.parameters():
                    parameter.requires_grad_(False)
            task.resident_bytes += tensor_bytes(list(task_model.head.parameters()))
            if head_family(task_model)[0] == "rows":
                self._take_head(task, task_model, config)
            self._next_slot += 1
            self.tasks[name] = task
        release_freed_heap()
        return task

    def _check_body(self, body: nn.Module) -> None:
        if self.body is None:
            self.body = body
        elif body is not self.body:
            raise MicrotuneError(
                "this artifact reads another part of the base than the loaded tasks (a causal-lm "
                "task beside classification tasks); serve it from its own multi-task model"
            )

    def _take_head(self, task: ResidentTask, task_model: nn.Module, config: dict) -> None:
        """The head's weight and bias as rows of its family's head table; the task keeps the
        view of its task record (shared), not its own model, config or head."""
        task.head_key = head_family(task_model)
        linear = task_model.head.linear
        if task.head_key not in self._heads:
            bias = None if linear.bias is None else SlotTable(linear.bias.detach())
            self._heads[task.head_key] = (SlotTable(linear.weight.detach()), bias)
        weights, biases = self._heads[task.head_key]
        weights.add(task.slot, linear.weight.detach())
        if biases is not None:
            biases.add(task.slot, linear.bias.detach())
        record = {k: config[k] for k in ("method", "task", "head", "max_length", "base_model")}
        key = json.dumps(record, sort_keys=True)
        if key not in self._views:
            self._views[key] = TunedModel(task_model, self.base.tokenizer, record, None)
        task.tuned = self._views[key]

    def _take_biases(self, task: ResidentTask) -> None:
        """Merge into the shared base, keep each changed bias as a row, restore the base."""
        task_model = task.tuned.task_model
        if task_model.method is not None:
            task_model.method.merge(self.body, task_model.arch)  # no config flags: restored
            task_model.method = None
        deltas = {}
        for path, module in bias_sites(self.base.model):
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
        for path, delta in deltas.items():
            self._biases.setdefault(path, SlotTable(delta)).add(task.slot, delta)
            self._hook(self.base.model, path, self._add_bias)
            task.resident_bytes += self._biases[path].row_bytes(task.slot)
        task.sites = tuple(sys.intern(path) for path in deltas)  # one string per site, shared

    def _take_lora(self, task: ResidentTask) -> None:
        method = task.tuned.task_model.method
        assert isinstance(method, LoRA)
        method.detach()
        for path in method.target_paths():
            factors = method.factors[path.replace(".", "-")]
            a = factors.A.detach().clone()
            b = (method.config.scale * factors.B.detach()).clone()
            self._loras.setdefault(path, LoRATarget()).add(task.slot, a, b)
            self._hook(self.body, path, self._add_lora)
            task.resident_bytes += tensor_bytes([self._loras[path].a.table[0]])
            task.resident_bytes += tensor_bytes([self._loras[path].b.table[0]])
            task.sites += (sys.intern(path),)
        task.tuned.task_model.method = None

    def _take_pafi(self, task: ResidentTask) -> None:
        """Keep the method (its values); share positions and originals with the same mask."""
        method = task.tuned.task_model.method
        assert isinstance(method, PaFi)
        shared = self._pafi_shared.setdefault(method.mask_fingerprint, method)
        if shared is not method:
            method.positions, method.original = shared.positions, shared.original
            task.resident_bytes += tensor_bytes([method.values])
        else:
            task.resident_bytes += tensor_bytes([method.values, method.positions, method.original])
        task.pafi = method
        task.tuned.task_model.method = None

    def _add_copy(self, artifact, name: str, config: dict[str, Any]) -> ResidentTask:
        """A method that cannot join a mixed batch: its own base copy, within the cap."""
        need = tensor_bytes(list(self.base.model.state_dict().values()))
        used = sum(t.resident_bytes for t in self.tasks.values() if t.kind == "copy")
        if used + need > self.max_copy_bytes:
            raise MicrotuneError(
                f"task '{name}' (method {config['method']}) cannot join a mixed batch and needs "
                f"its own copy of the base ({need / 2**20:.0f} MiB), over the copy cap "
                f"(max_copy_bytes={self.max_copy_bytes}, {used} in use); raise the cap "
                "(--max-copy-mb) or serve it with `microtune.load`/`microtune predict`"
            )
        task_model, tokenizer, config = load_artifact(artifact, self.model_name)
        task_model.to(self.device)
        tuned = TunedModel(task_model, tokenizer, config, artifact)
        stored = tensor_bytes(list(task_model.stored_state().values()))
        if task_model.method is not None and task_model.method.mergeable:
            tuned.merge()
        task = ResidentTask(name, self._next_slot, "copy", tuned, stored, need)
        self._next_slot += 1
        self.tasks[name] = task
        return task

    def remove(self, name: str) -> None:
        """Drop a task: its table rows, factors and head go; the base is untouched."""
        with self.lock:
            task = self.tasks.pop(name, None)
            if task is None:
                raise MicrotuneError(f"unknown task '{name}'; GET /v1/tasks lists the tasks")
            for table in self._biases.values():
                table.remove(task.slot)
            for target in self._loras.values():
                if target.a is not None and target.b is not None:
                    target.a.remove(task.slot)
                    target.b.remove(task.slot)
            for weights, biases in self._heads.values():
                for table in (weights, biases):
                    if table is not None:
                        table.remove(task.slot)
            if not any(other.tuned is task.tuned for other in self.tasks.values()):
                self._views = {k: v for k, v in self._views.items() if v is not task.tuned}

    def _hook(self, root: nn.Module, path: str, hook) -> None:
        key = f"{hook.__name__}:{path}"
        if key in self._hooked:
            return
        get_submodule(root, path).register_forward_hook(partial(hook, path))
        self._hooked.add(key)

    # -- the per-row hooks --------------------------------------------------------------

    def _add_bias(self, path: str, module: nn.Module, inputs, output: torch.Tensor):
        if self._rows is None:
            return None
        shift = self._biases[path].gather(self._rows, self._next_slot)
        if shift is None:
            return None
        check_rows(output, shift)
        shift = shift.view(shift.shape[0], *([1] * (output.dim() - 2)), shift.shape[-1])
        if not torch.is_grad_enabled() and shift.dtype == output.dtype:
            return output.add_(shift)  # the layer's own fresh output: no second tensor
        return (output + shift).to(output.dtype)

    def _add_lora(self, path: str, module: nn.Module, inputs, output: torch.Tensor):
        target = self._loras[path]
        if self._rows is None or target.a is None or target.b is None:
            return None
        a = target.a.gather(self._rows, self._next_slot)
        b = target.b.gather(self._rows, self._next_slot)
        if a is None or b is None:
            return None
        check_rows(output, a)
        x = inputs[0].to(a.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if a.shape[0] != flat.shape[0]:  # one task for the whole batch (generation)
            a, b = a.expand(flat.shape[0], -1, -1), b.expand(flat.shape[0], -1, -1)
        update = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return (output + update.view(output.shape)).to(output.dtype)

    @contextlib.contextmanager
    def rows_of(self, slots: Sequence[int]) -> Iterator[None]:
        """Within: every forward pass of the shared base adds the rows' own task updates (one
        slot: that task's, for batches of any size, as generation shrinks them)."""
        self._rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        try:
            yield
        finally:
            self._rows = None

    # -- serving --------------------------------------------------------------------------

    def task(self, name: str) -> ResidentTask:
        task = self.tasks.get(name)
        if task is None:
            raise MicrotuneError(f"unknown task '{name}'; GET /v1/tasks lists the tasks")
        return task

    def encode(self, name: str, inputs: Input | Sequence[Input]) -> EncodedRequest:
        """Check and tokenise one request's inputs for its task (one-line errors)."""
        tuned = self.task(name).tuned
        tuned.task_model.task_type.check_predicts()
        examples = tuned.examples(inputs)
        if not examples:
            raise MicrotuneError("inputs is empty; give at least one input")
        with_mask = tuned.task_model.head_config.readout == "mask"
        with self.tokenizer_lock:
            rows, labels = tuned.task_model.task_type.encode(
                tuned.tokenizer, examples, tuned.config["max_length"], with_mask
            )
        return EncodedRequest(name, examples, rows, labels)

    def predict(self, requests: Sequence[tuple[str, Input | Sequence[Input]]]) -> list[list]:
        """(task, inputs) requests → one list of `TunedModel.predict` records per request,
        all rows of every task in as few forward passes as the kinds allow."""
        encoded = [self.encode(name, inputs) for name, inputs in requests]
        return self.present(encoded, self.run(encoded))

    def logits(self, requests: Sequence[tuple[str, Input | Sequence[Input]]]) -> list:
        """(task, inputs) requests → the outputs of each request's rows, as `TunedModel.logits`."""
        return self.run([self.encode(name, inputs) for name, inputs in requests])

    def present(self, encoded: Sequence[EncodedRequest], outputs: Sequence) -> list[list]:
        """Each request's outputs as its task's `predict` records (label names, scores)."""
        results = []
        for request, output in zip(encoded, outputs, strict=True):
            tuned = self.tasks[request.task].tuned if request.task in self.tasks else None
            if tuned is None:
                raise MicrotuneError(f"task '{request.task}' was deleted while queued")
            present = tuned.task_model.task_type.present
            results.append(present(output, tuned.label_names, request.examples, request.labels))
        return results

    @torch.no_grad()
    def run(self, encoded: Sequence[EncodedRequest]) -> list:
        """Outputs per request (an (N, C) array, or per-token a list of (T_i, C) arrays): the
        "bias" and "lora" rows of every task in one forward pass, each PaFi task's and each
        copy's rows in a pass of their own."""
        with self.lock:
            rows: list[tuple[int, int, ResidentTask, Encoded]] = []  # (request, index, task, row)
            for r, request in enumerate(encoded):
                task = self.task(request.task)
                rows += [(r, i, task, row) for i, row in enumerate(request.rows)]
            groups: dict[str, list] = {}
            for item in rows:
                task = item[2]
                key = "shared" if task.kind in ("bias", "lora") else f"own:{task.name}"
                groups.setdefault(key, []).append(item)
            found: dict[tuple[int, int], np.ndarray] = {}
            for members in groups.values():
                found.update(self._run_group(members))
        outputs: list = []
        for r, request in enumerate(encoded):
            per_row = [found[(r, i)] for i in range(len(request.rows))]
            per_token = self.tasks[request.task].tuned.per_token
            outputs.append(per_row if per_token else np.stack(per_row))
        return outputs

    def _run_group(self, members: list) -> dict[tuple[int, int], np.ndarray]:
        task = members[0][2]
        model = task.tuned.task_model
        inputs = {
            k: v.to(self.device)
            for k, v in collate([m[3] for m in members], self.base.tokenizer.pad_token_id).items()
        }
        with contextlib.ExitStack() as stack:
            if task.kind in ("bias", "lora"):
                stack.enter_context(self.rows_of([m[2].slot for m in members]))
            elif task.pafi is not None:
                stack.enter_context(swapped_in(task.pafi))
            outputs = model.backbone_outputs(
                inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
            )
        hidden, pooled = outputs.last_hidden_state, getattr(outputs, "pooler_output", None)
        # Rows whose heads read the same way and have one shape share one batched head.
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

    def generate(self, name: str, prompts: Sequence[str], max_new_tokens: int = 64) -> list:
        """Greedy continuations for a causal-lm task (its rows alone, its update applied)."""
        task = self.task(name)
        with self.lock, self.tokenizer_lock, contextlib.ExitStack() as stack:
            if task.kind in ("bias", "lora"):
                stack.enter_context(self.rows_of([task.slot]))
            elif task.pafi is not None:
                stack.enter_context(swapped_in(task.pafi))
            return task.tuned.generate(list(prompts), max_new_tokens)

    def head_outputs(self, tasks: list[ResidentTask], hidden, pooled, inputs, positions):
        """Each row's own head on its features: tasks of one head table gather their rows'
        weights (B, C, D) for one batched matmul (as per-row heads in S-LoRA); a task with a
        head of its own (all `tasks` the same) runs it."""
        features = task_features(tasks[0], hidden, pooled, inputs, positions)
        if tasks[0].head_key is None:
            model = tasks[0].tuned.task_model
            return model.head(features.to(model.head.linear.weight.dtype))
        weights, biases = self._heads[tasks[0].head_key]
        slots = torch.tensor([task.slot for task in tasks], device=hidden.device)
        weight = weights.table[weights.index[slots]]
        out = torch.bmm(weight, features.to(weight.dtype)[:, :, None])[:, :, 0]
        if biases is not None:
            out = out + biases.table[biases.index[slots]]
        return out

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each task holds beyond the shared base (head, bias rows, factors, values)."""
        return {name: task.resident_bytes for name, task in self.tasks.items()}

    def base_bytes(self) -> int:
        return tensor_bytes(list(self.base.model.state_dict().values()))


def task_features(task: ResidentTask, hidden, pooled, inputs, positions: list[int]):
    """The task's read-out on its rows of the batch (as `TaskModel.forward`)."""
    model = task.tuned.task_model
    index = torch.tensor(positions, device=hidden.device)
    return read_out(
        model.head_config.readout,
        hidden[index],
        inputs["attention_mask"][index],
        inputs["input_ids"][index],
        mask_token_id=model.mask_token_id,
        pooled=None if pooled is None else pooled[index],
    )


def head_family(model: nn.Module) -> tuple:
    """Tasks with one key can share a batched head (and one head table): a sequence read-out
    and a linear head of one shape; any other task (per token, an LM head) keeps its own."""
    head = getattr(model.head, "linear", None)
    if model.head_config.readout == "tokens" or not isinstance(model.head, TaskHead):
        return ("own",)
    return ("rows", model.head_config.readout, tuple(head.weight.shape), head.bias is None)


@contextlib.contextmanager
def swapped_in(method: PaFi) -> Iterator[None]:
    """A PaFi task's k values written into the base weights, the originals back after."""
    method.merge(None, None)  # type: ignore[arg-type]  # PaFi's merge reads neither
    try:
        yield
    finally:
        method.unmerge()


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere a
    no-op). Loading a task allocates and frees megabytes (its method's projection, the merge);
    glibc keeps such pages resident below live allocations, which over a thousand hot-loads
    held ~5 KB per task of nothing (bench/serve_load.py memory)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


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


def load_base(artifact: str | os.PathLike, model: str | None, device: torch.device) -> LoadedBase:
    """The base model an artifact names (or `model`), in its dtype, with its fingerprints."""
    config = read_artifact_config(artifact)
    base = config["base_model"]
    task_type = task_type_of(config["task"])
    backbone, tokenizer = load_backbone(
        model or base["name"], base.get("dtype", "float32"), task_type.auto_class
    )
    backbone.to(device).eval()
    return LoadedBase(backbone, tokenizer, fingerprint(backbone), tokenizer_fingerprint(tokenizer))


def load_many(
    artifacts: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    model: str | None = None,
    device: str = "cpu",
    max_copy_bytes: int = 0,
) -> MultiTaskModel:
    """Load task artifacts onto one base model for mixed-task batches.

    Args:
        artifacts: folders (task names: the folder names) or {name: folder}.
        model: the base model, if not where the first artifact says (fingerprints checked).
        device: cpu, cuda, cuda:1 or auto.
        max_copy_bytes: memory for methods that cannot join a mixed batch (each needs its own
            copy of the base); 0 (default) refuses them.
    """
    if isinstance(artifacts, Mapping):
        named = dict(artifacts)
    else:
        named = {Path(a).resolve().name: a for a in artifacts}
        if len(named) != len(artifacts):
            raise MicrotuneError("two artifacts share a folder name; pass {name: folder}")
    if not named:
        raise MicrotuneError("load_many needs at least one artifact")
    where = resolve_device(device)
    first = next(iter(named.values()))
    engine = MultiTaskModel(load_base(first, model, where), where, max_copy_bytes, model)
    for name, folder in named.items():
        engine.add(folder, name)
    return engine


__all__ = ["KINDS", "EncodedRequest", "MultiTaskModel", "ResidentTask", "join_kind", "load_many"]
