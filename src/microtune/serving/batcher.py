"""The server's queue and its Prometheus series: `Batcher` (bounded admission, mixed batches of
any tasks' rows on one worker thread) and `Metrics` (one registry per app).

Requests are checked and tokenised on arrival, then wait in a bounded queue; the batcher takes
up to `max_batch_size` rows of any tasks, waiting at most `max_wait_ms` for more, and runs them
as one mixed batch (`MultiTaskModel.run`) on one worker thread, which also runs hot-loads and
copy tasks' generation, so the base is never used by two at once. A full queue answers 503 with
Retry-After; a batch that raises fails its own requests with 500 and the next batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from microtune.errors import MicrotuneError
from microtune.serving.config import ServeConfig
from microtune.serving.decoding import DecodeObserver
from microtune.serving.multitask import EncodedRequest, MultiTaskModel, present_outputs
from microtune.serving.wire import Admission, HTTPError

log = logging.getLogger("microtune.serving.http")


class Metrics:
    """The server's Prometheus series, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "microtune_requests", "requests by task and status", ["task", "status"], registry=r
        )
        self.latency = Histogram(
            "microtune_request_seconds", "request latency by task", ["task"], registry=r
        )
        self.batch_rows = Histogram(
            "microtune_batch_rows",
            "rows per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_depth = Gauge("microtune_queue_depth", "requests waiting or running", registry=r)
        self.tasks = Gauge("microtune_resident_tasks", "tasks loaded", registry=r)
        self.task_bytes = Gauge(
            "microtune_task_resident_bytes", "bytes a task holds beyond the base", ["task"],
            registry=r,
        )  # fmt: skip
        self.base_bytes = Gauge("microtune_base_bytes", "bytes of the shared base", registry=r)
        self.seen: dict[str, set[str]] = {}  # the statuses counted per task (to forget them)
        self.tokens = Counter("microtune_generated_tokens", "tokens decoded", registry=r)
        self.step_rows = Histogram(
            "microtune_decode_step_rows",
            "rows per decoding step (rows of every task share a step)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.first_token = Histogram(
            "microtune_time_to_first_token_seconds", "from admission to the first token", registry=r
        )

    def observer(self) -> DecodeObserver:
        """What the decoder reports, into these series."""
        return DecodeObserver(self.step_rows.observe, self.tokens.inc, self.first_token.observe)

    def count(self, task: str, status: str, started: float) -> None:
        self.requests.labels(task, status).inc()
        self.latency.labels(task).observe(time.perf_counter() - started)
        self.seen.setdefault(task, set()).add(status)

    def forget(self, task: str) -> None:
        """A deleted task's series go (its requests since: under "unknown")."""
        for status in self.seen.pop(task, ()):
            with contextlib.suppress(KeyError):
                self.requests.remove(task, status)
        with contextlib.suppress(KeyError):
            self.latency.remove(task)

    def resident(self, engine: MultiTaskModel) -> None:
        self.tasks.set(len(engine.tasks))
        self.task_bytes.clear()
        for name, size in engine.resident_bytes().items():
            self.task_bytes.labels(name).set(size)
        self.base_bytes.set(engine.base_bytes())


@dataclass
class Pending:
    request: EncodedRequest
    future: asyncio.Future
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.request.rows)


class Batcher:
    """The bounded queue and the loop that runs mixed batches on the worker thread."""

    def __init__(self, engine: MultiTaskModel, config: ServeConfig, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.admission = Admission(config.max_queue, config.retry_after_s, metrics.queue_depth.set)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="microtune-engine")
        self.task: asyncio.Task | None = None
        self.held: Pending | None = None  # taken but over the last batch's size: runs next

    def admit(self) -> contextlib.AbstractContextManager[None]:
        """A place in the bounded queue, or 503 with Retry-After."""
        return self.admission.held()

    async def call(self, function: Callable, *args: Any) -> Any:
        """Run on the worker thread (serialised with the batches)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def predict(self, request: EncodedRequest) -> list:
        """One admitted request, its rows cut into pieces of at most `max_batch_size` (so no
        request, however many inputs, runs as one giant forward pass); outputs in order."""
        with self.admit():
            loop = asyncio.get_running_loop()
            futures = []
            for piece in pieces(request, self.config.max_batch_size):
                futures.append(loop.create_future())
                await self.queue.put(Pending(piece, futures[-1]))
            outputs = await asyncio.gather(*futures)
        return [record for output in outputs for record in output]

    async def run_forever(self) -> None:
        while True:
            batch = await self._collect()
            self.metrics.batch_rows.observe(sum(p.rows for p in batch))
            try:
                outputs = await self.call(self._run, [p.request for p in batch])
            except Exception as error:  # noqa: BLE001 - a crash fails this batch only
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    if isinstance(output, Exception):
                        pending.future.set_exception(output)
                    else:
                        pending.future.set_result(output)

    async def _collect(self) -> list[Pending]:
        """The first waiting request, then more until the batch is full or the wait is over."""
        batch, self.held = [self.held or await self.queue.get()], None
        rows = batch[0].rows
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while rows < self.config.max_batch_size:
            left = deadline - time.monotonic()
            try:
                item = self.queue.get_nowait() if left <= 0 else None
            except asyncio.QueueEmpty:
                break
            if item is None:
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if rows + item.rows > self.config.max_batch_size:
                self.held = item  # first in the next batch (FIFO order kept)
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _run(self, requests: list[EncodedRequest]) -> list:
        """Requests whose task was deleted (404) or replaced under its name (409) while they
        waited are refused, never answered by another task; the rest run."""
        tasks = self.engine.tasks
        live = [r for r in requests if tasks.get(r.task) is r.resident]
        outputs = iter(present_outputs(live, self.engine.run(live)) if live else [])
        return [
            next(outputs) if tasks.get(r.task) is r.resident else refused(r, tasks)
            for r in requests
        ]


def pieces(request: EncodedRequest, size: int) -> list[EncodedRequest]:
    """The request cut into requests of at most `size` rows (rows, examples and labels align)."""
    count = len(request.rows)
    if count <= size or not len(request.examples) == len(request.labels) == count:
        return [request]
    return [
        replace(
            request,
            examples=request.examples[i : i + size],
            rows=request.rows[i : i + size],
            labels=request.labels[i : i + size],
        )
        for i in range(0, count, size)
    ]


def refused(request: EncodedRequest, tasks: dict) -> HTTPError:
    """The answer to a request whose task went while it waited: 404 deleted, 409 replaced."""
    if request.task not in tasks:
        return HTTPError(404, f"task '{request.task}' was deleted while the request waited")
    return HTTPError(
        409,
        f"task '{request.task}' was replaced (deleted and loaded again) while the request "
        "waited; send it again",
    )


@contextlib.contextmanager
def failures_as_500() -> Iterator[None]:
    """A crash in the engine answers this request 500 (traceback in the log, not the reply),
    and the connection and the server go on."""
    try:
        yield
    except (HTTPError, MicrotuneError):
        raise
    except Exception as error:  # noqa: BLE001 - any crash of a batch, load or generation
        log.exception("request failed")
        raise HTTPError(500, f"internal error ({type(error).__name__}); see the log") from None


__all__ = ["Batcher", "Metrics", "failures_as_500", "pieces"]
