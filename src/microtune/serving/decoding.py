"""Generation for many tenants of one decoder: a KV-cached decoding loop with continuous batching.

`Decoder` runs on a thread of its own. Every prompt is a `Generation`; it joins the running
batch between two decoding steps (its prompt prefilled into transformers' `DynamicCache`, then
spliced into the batch's cache, left-padded) and leaves it when it stops (EOS, a stop string,
`max_tokens`, a cancel), so a short request is never held behind a long one.

Rows share a lane, one forward pass per step, when their tasks share the base: the bare base,
and every "bias" or "lora" task (SLaSh, BitFit, HiWi's bias, the linear probe, LoRA), each row
adding its own task's rows through the same per-row hooks that classification batches use
(`serving.slots`). A "pafi" task, or a merged copy, decodes in a lane of its own. Greedy rows
give `microtune generate`'s tokens (the same prompt encoding, positions and EOS rule); sampled
rows (`temperature`, `top_p`) draw from a generator seeded per request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request
from torch import nn
from transformers import DynamicCache, TopPLogitsWarper

from microtune.errors import MicrotuneError
from microtune.serving.multitask import SHARED, MultiTaskModel, ResidentTask
from microtune.serving.wire import HTTPError

log = logging.getLogger("microtune.serve")
STATUS_OF_ERROR = {"deleted": 409, "shutting": 503}  # why a row ended -> its HTTP status; else 500


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token: greedy at temperature 0, else sampled (nucleus `top_p`)
    from a generator seeded with `seed` (random when None), so a seed reproduces a text."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Generation:
    """One prompt's decoding: what was asked, what came out, where its news goes.

    `task` is the resident task it was admitted for (None: the bare base model). `notify` is
    called on the decoding thread after every token and once more when it ends (`done`)."""

    task: ResidentTask | None
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: Sampling = Sampling()
    notify: Callable[[Generation], None] = lambda generation: None
    request: object = None  # the rows of one request share it (the batch's fair shares)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the decoded tokens, cut before a stop string
    finish_reason: str | None = None  # "stop" (EOS, a stop string) or "length"
    error: str | None = None  # why it ended without finishing (a deleted task, shutdown)
    cancelled: bool = False  # set by the client's side: the row leaves at the next step
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # seconds from submission to the first token
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.cancelled

    def settled_text(self) -> str:
        """The text a stream may send by now: all of it once done; while running, less any
        tail that may still turn into a stop string or is half a character."""
        if self.done:
            return self.text
        text = self.text.rstrip("\ufffd")
        held = max(
            (n for stop in self.stop for n in range(1, len(stop)) if text.endswith(stop[:n])),
            default=0,
        )
        return text[: len(text) - held]


def stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, if any does."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None


def choose_tokens(logits: torch.Tensor, rows: list[Generation]) -> list[int]:
    """Each row's next token: argmax for greedy rows, else a draw from its own generator after
    temperature and top-p (transformers' warper)."""
    picks = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        sampling = row.sampling
        if sampling.temperature <= 0:
            continue
        scores = logits[i : i + 1].float() / sampling.temperature
        if sampling.top_p < 1.0:
            scores = TopPLogitsWarper(sampling.top_p)(None, scores)
        if row.generator is None:
            seed = sampling.seed if sampling.seed is not None else torch.seed()
            row.generator = torch.Generator().manual_seed(seed)
        probs = torch.softmax(scores, -1).cpu()
        picks[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return picks


def record_token(row: Generation, token: int, tokenizer: Any, eos: int | None) -> None:
    """Append a decoded token and settle whether the row is finished (EOS is not part of the
    text, as in `microtune generate`)."""
    if row.first_token_s is None:
        row.first_token_s = time.perf_counter() - row.submitted
    if token == eos:
        row.finish_reason = "stop"
        return
    row.tokens.append(token)
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    cut = stop_cut(text, row.stop)
    row.text = text if cut is None else text[:cut]
    if cut is not None:
        row.finish_reason = "stop"
    elif len(row.tokens) >= row.max_tokens:
        row.finish_reason = "length"


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before the existing entries of `dim`, up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


class Lane:
    """Rows that share one forward pass per step: one body, one head, one KV cache.

    The cache is left-padded (every row's newest token in the last column); `mask` marks each
    row's real columns and `lengths` counts them, which gives each new token its position."""

    def __init__(self, body: nn.Module, head: nn.Module, context: Callable[[list[int]], Any]):
        self.body, self.head, self.context = body, head, context
        # transformers renamed `past_key_values` to `cache` (5.x deprecates the old name)
        forward = inspect.signature(body.forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"
        self.rows: list[Generation] = []
        self.slots: list[int] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)

    def _forward(self, ids, mask, positions, cache, slots: list[int]) -> torch.Tensor:
        """The last position's logits of each row, the rows' task updates applied."""
        with self.context(slots):
            hidden = self.body(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_argument: cache},
            ).last_hidden_state[:, -1]
            return self.head(hidden.to(self.head_dtype())).float()

    def head_dtype(self) -> torch.dtype:
        linear = getattr(self.head, "linear", self.head)
        return linear.weight.dtype

    def join(self, rows: list[Generation], slots: list[int], device: torch.device):
        """Prefill the new rows together (left-padded) and splice them into the batch; returns
        their first tokens' logits."""
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
            device=device,
        )
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.body.config)
        logits = self._forward(ids, mask, positions, cache, slots)
        self._splice(cache, mask.cpu())
        self.rows += rows
        self.slots += slots
        self.lengths = torch.cat([self.lengths, mask.sum(-1).cpu()])
        return logits

    def _splice(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append a prefilled cache's rows to the batch's, both left-padded to one width."""
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                joined = [left_pad(getattr(x, name), width, -2) for x in (mine, theirs)]
                setattr(mine, name, torch.cat(joined, 0))
        self.mask = torch.cat([left_pad(m, width, 1) for m in (self.mask, mask)], 0)

    def step(self, device: torch.device) -> torch.Tensor:
        """One decoding step of every row: each row's latest token in, its next logits out."""
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        logits = self._forward(
            self.last.view(-1, 1).to(device),
            self.mask.to(device),
            self.lengths.view(-1, 1).to(device),
            self.cache,
            self.slots,
        )
        self.lengths += 1
        return logits

    def keep(self, alive: list[int]) -> None:
        """Keep only these rows (indices), and drop the columns no kept row needs."""
        if len(alive) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in alive]
        self.slots = [self.slots[i] for i in alive]
        if not alive:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.lengths, self.last = self.lengths[:0], self.last[:0]
            return
        index = torch.tensor(alive)
        self.mask, self.lengths, self.last = self.mask[index], self.lengths[index], self.last[index]
        start = int(self.mask.any(0).int().argmax())  # leading columns every row pads
        assert self.cache is not None
        self.cache.batch_select_indices(index.to(self.cache.layers[0].keys.device))
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


@dataclass
class DecodeObserver:
    """What the decoder reports (the server's /metrics): rows per step, tokens, first token."""

    step: Callable[[int], None] = lambda rows: None
    tokens: Callable[[int], None] = lambda count: None
    first_token: Callable[[float], None] = lambda seconds: None


class Watch:
    """The decoder's news of some generations, delivered on the caller's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Generation] = asyncio.Queue()

    def notify(self, generation: Generation) -> None:  # called on the decoding thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, generation)


class Decoder:
    """The decoding thread of a multi-task model: continuous batching over lanes of rows."""

    def __init__(
        self,
        engine: MultiTaskModel,
        max_rows: int,
        observer: DecodeObserver | None = None,
        continuous: bool = True,
    ):
        """`continuous=False`: rows join only an empty batch (static batching, for comparison:
        bench/serve_generate.py)."""
        self.engine, self.max_rows, self.continuous = engine, max_rows, continuous
        self.observer = observer or DecodeObserver()
        self.lanes: dict[Any, Lane] = {}
        self.waiting: deque[Generation] = deque()
        self.changed = threading.Condition()
        self.closing: str | None = None
        self.thread: threading.Thread | None = None
        tokenizer = engine.base.tokenizer
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id

    # -- the caller's side (any thread) ---------------------------------------------------

    def submit(self, generation: Generation) -> None:
        """Queue a prompt; it joins the batch at the next step with room."""
        check_decodable(self.engine, generation.task)
        with self.changed:
            if self.closing:
                raise MicrotuneError(self.closing)
            self.waiting.append(generation)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="microtune-decode")
                self.thread.daemon = True
                self.thread.start()
            self.changed.notify()

    def cancel(self, generation: Generation) -> None:
        """The client went away: its row leaves at the next step (or never joins)."""
        with self.changed:
            generation.cancelled = True
            self.changed.notify()

    def close(self, reason: str = "the server is shutting down", wait: bool = True) -> None:
        """End every row at the next step (`error` = reason) and stop the thread (`wait`: until
        it has, at most 10 s; a signal handler does not wait)."""
        with self.changed:
            self.closing = self.closing or reason
            self.changed.notify()
        if wait and self.thread is not None:
            self.thread.join(10.0)

    def rows(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())

    # -- the decoding thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.changed:
                while not self.closing and not self.waiting and not self.rows():
                    self.changed.wait()
                joining = self._take_waiting()
            if self.closing:
                break
            try:
                with self.engine.lock, torch.no_grad():
                    self._join(joining)
                    self._step()
            except Exception as error:  # noqa: BLE001 - fail these rows, keep serving
                log.exception("decoding step failed")
                self._end_all(f"internal error ({type(error).__name__}); see the log")
        self._end_all(self.closing or "stopped")

    def _take_waiting(self) -> list[Generation]:
        """The waiting rows that join now: the requests with the fewest rows decoding first,
        and none past its share of the batch, so that a request of many long rows leaves room
        for the requests behind it (no head-of-line blocking by one request)."""
        room = self.max_rows - self.rows() if self.continuous or not self.rows() else 0
        share = max(1, self.max_rows - self.max_rows // 4)
        decoding = Counter(request_of(r) for lane in self.lanes.values() for r in lane.rows)
        joining = []
        for generation in sorted(self.waiting, key=lambda g: decoding[request_of(g)]):
            if generation.cancelled:
                generation.notify(generation)
            elif len(joining) < room and decoding[request_of(generation)] < share:
                joining.append(generation)
                decoding[request_of(generation)] += 1
        taken = {id(g) for g in joining}
        self.waiting = deque(g for g in self.waiting if id(g) not in taken and not g.cancelled)
        return joining

    def _join(self, joining: list[Generation]) -> None:
        by_lane: dict[Any, list[Generation]] = {}
        for generation in joining:
            if self._still_loaded(generation):
                by_lane.setdefault(lane_key(generation.task), []).append(generation)
        for key, rows in by_lane.items():
            lane = self.lanes.get(key)
            if lane is None:
                lane = self.lanes[key] = Lane(*lane_parts(self.engine, rows[0].task))
            logits = lane.join(rows, [slot_of(r.task) for r in rows], self.engine.device)
            self._advance(lane, rows, logits, len(lane.rows) - len(rows))

    def _step(self) -> None:
        for key, lane in list(self.lanes.items()):
            alive = [i for i, r in enumerate(lane.rows) if self._still_loaded(r)]
            lane.keep(alive)
            if lane.rows:
                self.observer.step(len(lane.rows))
                self._advance(lane, lane.rows, lane.step(self.engine.device), 0)
            if not lane.rows:
                del self.lanes[key]

    def _advance(self, lane: Lane, rows: list[Generation], logits, offset: int) -> None:
        """Record each row's next token, tell its caller, and let finished rows leave."""
        picks = choose_tokens(logits, rows)
        for row, token in zip(rows, picks, strict=True):
            first = row.first_token_s is None
            record_token(row, token, self.tokenizer, self.eos)
            if first:
                self.observer.first_token(row.first_token_s or 0.0)
            row.notify(row)
        self.observer.tokens(len(rows))
        new_last = torch.tensor(picks, dtype=torch.long)
        lane.last = torch.cat([lane.last[:offset], new_last]) if offset else new_last
        lane.keep([i for i, row in enumerate(lane.rows) if not row.done])

    def _still_loaded(self, row: Generation) -> bool:
        """A row whose task was deleted or replaced since it was admitted ends, refused."""
        if row.done:
            return False
        task = row.task
        if task is not None and self.engine.tasks.get(task.name) is not task:
            row.error = f"task '{task.name}' was deleted or replaced; send the request again"
            row.notify(row)
            return False
        return True

    def _end_all(self, reason: str) -> None:
        with self.changed:
            rows = [r for lane in self.lanes.values() for r in lane.rows] + list(self.waiting)
            self.lanes.clear()
            self.waiting.clear()
        for row in rows:
            if not row.done:
                row.error = reason
            row.notify(row)


def request_of(generation: Generation) -> int:
    """The request a row belongs to (a row without one is its own)."""
    return id(generation.request if generation.request is not None else generation)


def lane_key(task: ResidentTask | None) -> Any:
    """Rows of the bare base and of every "bias"/"lora" task share a lane; others their own."""
    return "shared" if task is None or task.kind in SHARED else id(task)


def slot_of(task: ResidentTask | None) -> int:
    return 0 if task is None else task.slot


def causal_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, LM head) of a `...ForCausalLM` base; None for any other model."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if body is None or body is model or not isinstance(head, nn.Linear):
        return None
    return body, head


def check_decodable(engine: MultiTaskModel, task: ResidentTask | None) -> None:
    """Refuse, in one line, what this decoder cannot serve."""
    if task is None:
        if causal_parts(engine.base.model) is None:
            raise MicrotuneError(
                "the base model is not a causal language model; it cannot generate"
            )
        return
    task_model = task.tuned.task_model
    task_model.task_type.check_generates()
    if task.kind == "copy" and task_model.method is not None:
        raise MicrotuneError(
            f"task '{task.name}' (method {task.method}) cannot decode with a key/value cache; "
            "use POST /v1/generate, or `microtune generate`"
        )


def lane_parts(engine: MultiTaskModel, task: ResidentTask | None):
    """(body, head, context) of the lane the task's rows decode in."""
    if lane_key(task) == "shared":
        parts = causal_parts(engine.base.model)
        assert parts is not None
        return (*parts, lambda slots: engine.rows.rows_of(slots, engine.next_slot))
    assert task is not None
    task_model = task.tuned.task_model
    return task_model.backbone, task_model.head, lambda slots: engine.applied(task, slots)


def error_of(generation: Generation) -> HTTPError:
    reason = generation.error or "stopped"
    status = next((s for key, s in STATUS_OF_ERROR.items() if key in reason), 500)
    return HTTPError(status, reason)


async def all_done(
    request: Request, decoder: Decoder, rows: list[Generation], watch: Watch
) -> None:
    """Wait until every row is done; a client that went away cancels them (they leave the
    batch at the next step); a row that ended without finishing is the request's error."""
    try:
        while not all(row.done for row in rows):
            try:
                await asyncio.wait_for(watch.queue.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    break
    finally:
        for row in rows:
            if not row.done:
                decoder.cancel(row)
    failed = next((row for row in rows if row.error), None)
    if failed is not None:
        raise error_of(failed)


__all__ = [
    "DecodeObserver",
    "Decoder",
    "Generation",
    "Sampling",
    "Watch",
    "all_done",
    "error_of",
    "check_decodable",
    "causal_parts",
]
