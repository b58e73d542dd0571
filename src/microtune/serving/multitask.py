"""Many tasks on one base model, in one batch: `microtune.load_many`.

One base model sits in memory; each task artifact on it (fingerprints checked by
`load_artifact`, onto the loaded base) keeps only what differs from the base, and one forward
pass serves a batch whose rows belong to different tasks. How a task joins is its method's
answer (`Method.serving_join`; this module names no method):

- "bias" (SLaSh at any position, BitFit, HiWi's bias variant, the linear probe): merged, the
  task differs from the base only in bias vectors, so the loader merges it into the shared
  base, keeps the per-site differences as one row of that site's task table, and puts the base
  back bit for bit. A forward hook on each site adds every row's own bias row (one gather, one
  add); a linear probe has no row at all (`serving.slots`).
- "lora": each target keeps the tasks' A and scale·B (`Method.low_rank_rows`) stacked,
  zero-padded to the largest rank; a hook adds x Aᵀ Bᵀ per row with gathered factors and two
  batched matmuls (the Punica / S-LoRA scheme in plain torch; `serving.slots`).
- "pafi": values swapped into the base weights (`Method.swapped_values`); the task's rows run
  as their own group with the values written in (PaFi: O(k)) and the originals written back
  after. Tasks of one group (PaFi: one mask) share its positions and original values.
- "copy" (every other method: prompts, full fine-tuning, dense weight methods): it cannot join
  a mixed batch: it gets its own copy of the base (merged where it can be) only within
  `max_copy_bytes`, else loading refuses it in one line naming the cap.

Each row is read out by its own task's read-out and head (`serving.heads`). `predict` returns,
per request, what `TunedModel.predict` returns for that task; `generate` serves causal-lm tasks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microtune.artifacts.store import LoadedBase, load_artifact, load_base, read_artifact_config
from microtune.backbone.load import resolve_device
from microtune.errors import MicrotuneError
from microtune.methods import method_class
from microtune.methods.base import JOINS, SwappedValues
from microtune.serving.heads import HeadTables, head_family
from microtune.serving.slots import SiteRows, tensor_bytes
from microtune.serving.tuned import Input, TunedModel
from microtune.tasks.data import Encoded, collate
from microtune.tasks.spec import Example

KINDS = JOINS
SHARED = ("bias", "lora")  # the kinds whose rows of every task share one forward pass


def join_kind(config: Mapping[str, Any]) -> str:
    """How an artifact joins a mixed batch, as its method declares for its options
    (`Method.serving_join`): "bias", "lora", "pafi", or "copy" (it cannot)."""
    cls = method_class(config["method"])
    kind = cls.serving_join(cls.config_class.from_dict(config.get("method_config", {})))
    if kind not in KINDS:
        raise TypeError(f"method '{cls.name}': serving_join gave {kind!r}, not one of {KINDS}")
    return kind


@dataclass(eq=False, slots=True)
class ResidentTask:
    """One task of the multi-task model: a light record, its tensors in the engine's tables.

    `tuned` gives the task's read-out, task type and label names: for a "bias" or "lora" task
    with a linear head it is a view shared by every task with the same task record (its head
    unused: this task's head weights are rows of the engine's head table `head_key`); else the
    task's own `TunedModel` (its head; its own base copy for "copy" tasks; `swap` holds the
    values a "pafi" task swaps in)."""

    name: str
    slot: int
    kind: str
    tuned: TunedModel
    artifact_bytes: int
    resident_bytes: int = 0
    swap: SwappedValues | None = None
    sites: tuple[str, ...] = ()
    head_key: tuple | None = None

    @property
    def method(self) -> str:
        return self.tuned.config["method"]


@dataclass
class EncodedRequest:
    """One request's inputs checked and tokenised for its task (so a bad input fails before
    it joins a batch), bound to the exact task it was admitted for (`resident`): if that task is
    deleted, reloaded or replaced under the same name before the request runs, it is refused
    (`admitted_task`), never answered by another task. `top_k`: each input's answer is its k
    most probable labels, best first (`TaskType.rank`), instead of the best one."""

    task: str
    examples: list[Example]
    rows: list[Encoded]
    labels: list[Any]
    resident: ResidentTask
    top_k: int | None = None


def admitted_task(tasks: Mapping[str, ResidentTask], request: EncodedRequest) -> ResidentTask:
    """The task `request` was admitted for, if it is still the one loaded under its name."""
    task = tasks.get(request.task)
    if task is not request.resident:
        what = "deleted" if task is None else "replaced (deleted and loaded again)"
        raise MicrotuneError(
            f"task '{request.task}' was {what} while the request waited; send it again"
        )
    return task


def request_pairs(requests: Any) -> list[tuple[str, Any]]:
    """`predict`'s requests as (task name, inputs) pairs, or one line saying what they must be."""
    pairs = list(requests) if isinstance(requests, list | tuple) else None
    if pairs is None or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise MicrotuneError(
            "requests must be a list of (task, inputs) pairs, e.g. [('sentiment', ['a text'])]; "
            f"got {type(requests).__name__}"
        )
    return [(str(name), inputs) for name, inputs in pairs]


def present_outputs(encoded: Sequence[EncodedRequest], outputs: Sequence) -> list[list]:
    """Each request's outputs as its own task's `predict` records (label names, scores), or
    its inputs' `top_k` best labels."""
    results = []
    for request, output in zip(encoded, outputs, strict=True):
        tuned = request.resident.tuned
        task_type = tuned.task_model.task_type
        if request.top_k is not None:
            results.append(task_type.rank(output, tuned.label_names, request.top_k))
        else:
            results.append(
                task_type.present(output, tuned.label_names, request.examples, request.labels)
            )
    return results


class SwapGroups:
    """The swapped values of "pafi" tasks by group: the group's first task holds the shared
    tensors (PaFi: one mask's positions and original values) for every task of the group."""

    def __init__(self) -> None:
        self.first: dict[str, SwappedValues] = {}

    def take(self, swap: SwappedValues) -> int:
        """Share the group's tensors with its first task; the bytes this task holds."""
        first = self.first.setdefault(swap.group, swap)
        if first is not swap:
            swap.share(first)
            return tensor_bytes(list(swap.own))
        return tensor_bytes([*swap.own, *swap.shared])


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
        self.rows = SiteRows(base.model, device)  # every task's bias and low-rank rows
        self.heads = HeadTables()
        self.swaps = SwapGroups()
        self._views: dict[str, TunedModel] = {}  # task record -> the view its tasks share
        self.body: nn.Module | None = None  # the part of the base the tasks' heads read

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
                task = self._add_copy(artifact, name, config)
            else:
                task = self._add_joined(artifact, name, kind)
            self._next_slot += 1
            self.tasks[name] = task
        release_freed_heap()
        return task

    def _add_joined(self, artifact, name: str, kind: str) -> ResidentTask:
        """A task that joins the mixed batch, onto the shared base."""
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
            self._take_method(task)
        finally:
            for parameter in self.base.model.parameters():
                parameter.requires_grad_(False)
        # A causal LM's head is the base's own LM head: the base's bytes, not the task's; its
        # method is gone (above), so nothing substitutes the embedding the head watches.
        stop_watching = getattr(task_model.head, "stop_watching", None)
        if stop_watching is not None:
            stop_watching()
        shared = {id(p) for p in self.base.model.parameters()}
        own = [p for p in task_model.head.parameters() if id(p) not in shared]
        task.resident_bytes += tensor_bytes(own)
        if head_family(task_model)[0] == "rows":
            self._take_head(task, task_model, config)
        return task

    def _check_body(self, body: nn.Module) -> None:
        if self.body is None:
            self.body = body
        elif body is not self.body:
            raise MicrotuneError(
                "this artifact reads another part of the base than the loaded tasks (a causal-lm "
                "task beside classification tasks); serve it from its own multi-task model"
            )

    def _take_method(self, task: ResidentTask) -> None:
        """What the task's method changes, kept as its kind keeps it; the model keeps no method:
        "bias": merged into the shared base, its changed biases kept as rows, the base restored;
        "lora": its low-rank factors as rows; "pafi": its swapped values."""
        task_model = task.tuned.task_model
        method, task_model.method = task_model.method, None
        if task.kind == "bias":
            if method is not None:
                method.merge(self.body, task_model.arch)  # no config flags: restored
            task.sites, held = self.rows.take_merged_biases(task.slot)
        elif task.kind == "lora":
            assert method is not None and self.body is not None
            method.detach()  # the rows' hooks add its update from now on
            task.sites, held = self.rows.add_low_rank(task.slot, self.body, method.low_rank_rows())
        else:
            assert method is not None
            task.swap = method.swapped_values()
            held = self.swaps.take(task.swap)
        task.resident_bytes += held

    def _take_head(self, task: ResidentTask, task_model: nn.Module, config: dict) -> None:
        """The head's weight and bias as rows of its family's head table; the task keeps the
        view of its task record (shared), not its own model, config or head."""
        task.head_key = head_family(task_model)
        self.heads.add(task.head_key, task.slot, task_model.head.linear)
        record = {k: config[k] for k in ("method", "task", "head", "max_length", "base_model")}
        key = json.dumps(record, sort_keys=True)
        if key not in self._views:
            self._views[key] = TunedModel(task_model, self.base.tokenizer, record, None)
        task.tuned = self._views[key]

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
        return ResidentTask(name, self._next_slot, "copy", tuned, stored, need)

    def remove(self, name: str) -> None:
        """Drop a task: its table rows, factors and head go; the base is untouched."""
        with self.lock:
            task = self.task(name)  # an unknown name: its one-line error
            del self.tasks[name]
            self.rows.remove(task.slot)
            self.heads.remove(task.slot)
            if not any(other.tuned is task.tuned for other in self.tasks.values()):
                self._views = {k: v for k, v in self._views.items() if v is not task.tuned}

    def applied(self, task: ResidentTask, slots: Sequence[int]):
        """Within: the base computes with the task's update for rows of these task slots (for a
        "bias" or "lora" task any mix of such tasks' slots; one slot: for batches of any size)."""
        if task.kind in SHARED:
            return self.rows.rows_of(slots, self.next_slot)
        if task.swap is not None:
            return swapped_in(task.swap)
        return contextlib.nullcontext()

    # -- serving --------------------------------------------------------------------------

    @property
    def next_slot(self) -> int:
        """Every loaded task's slot is below it (the row tables' size)."""
        return self._next_slot

    def task(self, name: str) -> ResidentTask:
        task = self.tasks.get(name)
        if task is None:
            raise MicrotuneError(f"unknown task '{name}'; GET /v1/tasks lists the tasks")
        return task

    def encode(self, name: str, inputs: Input | Sequence[Input]) -> EncodedRequest:
        """Check and tokenise one request's inputs for its task (one-line errors)."""
        task = self.task(name)
        tuned = task.tuned
        tuned.task_model.task_type.check_predicts()
        if not isinstance(inputs, str | list | tuple | dict):
            raise MicrotuneError(f"task '{name}': inputs must be a text or a list of inputs")
        examples = tuned.examples(inputs)
        if not examples:
            raise MicrotuneError("inputs is empty; give at least one input")
        with self.tokenizer_lock:
            rows, labels = tuned.task_model.encode(
                tuned.tokenizer, examples, tuned.config["max_length"]
            )
        return EncodedRequest(name, examples, rows, labels, task)

    def predict(self, requests: Sequence[tuple[str, Input | Sequence[Input]]]) -> list[list]:
        """(task, inputs) requests → one list of `TunedModel.predict` records per request,
        all rows of every task in as few forward passes as the kinds allow."""
        encoded = [self.encode(name, inputs) for name, inputs in request_pairs(requests)]
        return present_outputs(encoded, self.run(encoded))

    def logits(self, requests: Sequence[tuple[str, Input | Sequence[Input]]]) -> list:
        """(task, inputs) requests → the outputs of each request's rows, as `TunedModel.logits`."""
        return self.run([self.encode(name, inputs) for name, inputs in request_pairs(requests)])

    @torch.no_grad()
    def run(self, encoded: Sequence[EncodedRequest]) -> list:
        """Outputs per request (an (N, C) array, or per-token a list of (T_i, C) arrays): the
        "bias" and "lora" rows of every task in one forward pass, each "pafi" task's and each
        copy's rows in a pass of their own."""
        with self.lock:
            rows: list[tuple[int, int, ResidentTask, Encoded]] = []  # (request, index, task, row)
            for r, request in enumerate(encoded):
                task = admitted_task(self.tasks, request)
                rows += [(r, i, task, row) for i, row in enumerate(request.rows)]
            groups: dict[str, list] = {}
            for item in rows:
                task = item[2]
                key = "shared" if task.kind in SHARED else f"own:{task.name}"
                groups.setdefault(key, []).append(item)
            found: dict[tuple[int, int], np.ndarray] = {}
            for members in groups.values():
                found.update(self._run_group(members))
        outputs: list = []
        for r, request in enumerate(encoded):
            per_row = [found[(r, i)] for i in range(len(request.rows))]
            per_token = request.resident.tuned.per_token
            outputs.append(per_row if per_token else np.stack(per_row))
        return outputs

    def _run_group(self, members: list) -> dict[tuple[int, int], np.ndarray]:
        """One forward pass of the base for these (request, index, task, row) members, each
        row read out through its own task's head."""
        task = members[0][2]
        inputs = {
            k: v.to(self.device)
            for k, v in collate([m[3] for m in members], self.base.tokenizer.pad_token_id).items()
        }
        with self.applied(task, [m[2].slot for m in members]):
            outputs = task.tuned.task_model.backbone_outputs(
                inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
            )
        pooled = getattr(outputs, "pooler_output", None)
        return self.heads.read_rows(members, outputs.last_hidden_state, pooled, inputs)

    def generate(self, name: str, prompts: Sequence[str], max_new_tokens: int = 64) -> list:
        """Greedy continuations for a causal-lm task (its rows alone, its update applied)."""
        task = self.task(name)
        with self.lock, self.tokenizer_lock, self.applied(task, [task.slot]):
            return task.tuned.generate(prompts, max_new_tokens)  # one text: one prompt

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each task holds beyond the shared base (head, bias rows, factors, values)."""
        return {name: task.resident_bytes for name, task in self.tasks.items()}

    def base_bytes(self) -> int:
        return tensor_bytes(list(self.base.model.state_dict().values()))


@contextlib.contextmanager
def swapped_in(swap: SwappedValues) -> Iterator[None]:
    """A task's values written into the base weights, the originals back after."""
    swap.swap_in()
    try:
        yield
    finally:
        swap.swap_out()


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


def load_many(
    artifacts: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike],
    model: str | None = None,
    device: str = "cpu",
    max_copy_bytes: int = 0,
) -> MultiTaskModel:
    """Load task artifacts onto one base model for mixed-task batches.

    Args:
        artifacts: folders, as a list or any iterable (task names: the folder names), or
            {name: folder}; one path alone is refused (pass a list of one).
        model: the base model, if not where the first artifact says (fingerprints checked).
        device: cpu, cuda, cuda:1 or auto.
        max_copy_bytes: memory for methods that cannot join a mixed batch (each needs its own
            copy of the base); 0 (default) refuses them.
    """
    if isinstance(artifacts, str | bytes | os.PathLike):
        raise MicrotuneError(
            f"load_many takes a list of artifact folders (or {{name: folder}}), not one path; "
            f"pass [{os.fsdecode(artifacts)!r}], or use microtune.load for one task"
        )
    if isinstance(artifacts, Mapping):
        named = dict(artifacts)
    else:
        folders = list(artifacts)  # a generator too
        named = {Path(a).resolve().name: a for a in folders}
        if len(named) != len(folders):
            raise MicrotuneError("two artifacts share a folder name; pass {name: folder}")
    if not named:
        raise MicrotuneError("load_many needs at least one artifact")
    where = resolve_device(device)
    first = next(iter(named.values()))
    engine = MultiTaskModel(load_base(first, model, where), where, max_copy_bytes, model)
    for name, folder in named.items():
        engine.add(folder, name)
    return engine


__all__ = [
    "KINDS",
    "EncodedRequest",
    "MultiTaskModel",
    "ResidentTask",
    "admitted_task",
    "join_kind",
    "load_many",
    "present_outputs",
]
