"""`microtune serve`: many tasks on one base model over HTTP (FastAPI on uvicorn).

Endpoints: `POST /v1/predict` {"task", "inputs"}, `POST /v1/generate` {"task", "prompts",
"max_new_tokens"}, `GET /v1/tasks`, `POST /v1/tasks` {"name", "path"} (hot-load, only under
`--artifact-root`), `DELETE /v1/tasks/{name}`, `GET /health` (live), `GET /ready` (tasks
loaded), `GET /metrics` (Prometheus text). A field an endpoint does not honour (`temperature`,
`stream`) is refused with 422 naming it, never ignored.

Requests are checked and tokenised on arrival (a bad one is a JSON 4xx at once), then wait in a
bounded queue; one batcher takes up to `max_batch_size` rows of any tasks, waiting at most
`max_wait_ms` for more, and runs them as one mixed batch (`MultiTaskModel.run`) on one worker
thread, which also runs hot-loads and generation, so the base is never used by two at once. A
full queue answers 503 with Retry-After; a batch that raises fails its own requests with 500
and the next batch runs. uvicorn's graceful shutdown drains: it stops accepting, and the
batcher keeps running until every in-flight request has its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as RoutingError

from microtune.common.files import check_inside
from microtune.errors import MicrotuneError
from microtune.serving.config import ServeConfig
from microtune.serving.decoding import DecodeObserver, Decoder, Generation, Watch
from microtune.serving.multitask import EncodedRequest, MultiTaskModel
from microtune.serving.openai_routes import SCHEMAS, add_openai_routes, all_done
from microtune.serving.wire import (
    Admission,
    HTTPError,
    error_response,
    field_of,
    only_fields,
    read_json,
)
from microtune.version import __version__

INFERENCE_PATHS = (
    "/v1/predict",
    "/v1/generate",
    "/v1/completions",
    "/v1/chat/completions",
)  # counted by task and status in /metrics
OPEN_PATHS = ("/health", "/docs", "/openapi.json")  # no API key: liveness, the API's description
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
        outputs = iter(self.engine.present(live, self.engine.run(live)) if live else [])
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


def create_app(engine: MultiTaskModel, config: ServeConfig) -> FastAPI:
    """The ASGI app over a loaded multi-task model (`microtune.serving.multitask.load_many`)."""
    metrics = Metrics()
    metrics.resident(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = app.state.batcher = Batcher(engine, config, metrics)
        batcher.task = asyncio.create_task(batcher.run_forever())
        yield
        # uvicorn has drained the in-flight requests by now (a SIGTERM ended every row that
        # was decoding, `serve`); stop the decoder, the loop and the worker.
        app.state.decoder.close()
        batcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batcher.task
        batcher.worker.shutdown(wait=True)

    app = FastAPI(title="microtune", version=__version__, lifespan=lifespan, redoc_url=None)
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    app.state.decoder = Decoder(engine, config.max_batch_size, metrics.observer())
    add_guards(app, config)
    add_counting(app, engine, metrics)  # outside the guards: their 401 and 413 are counted
    add_routes(app)
    add_openai_routes(app)
    describe_bodies(app)
    return app


def describe_bodies(app: FastAPI) -> None:
    """/openapi.json with the request bodies the routes read themselves (`request_schema`)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = plain()  # FastAPI's, built once and kept
        if fresh:
            schema.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


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


def add_counting(app: FastAPI, engine: MultiTaskModel, metrics: Metrics) -> None:
    """Count and time every inference request under its final status, whatever answered it
    (the route, the API key or body guard, a crash), labelled with its task while that task is
    loaded, else "unknown" (so a stranger's task names never become series)."""

    @app.middleware("http")
    async def counted(request: Request, call_next):
        if request.url.path not in INFERENCE_PATHS:
            return await call_next(request)
        started, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            task = getattr(request.state, "task", None)
            metrics.count(task if task in engine.tasks else "unknown", str(status), started)


def valid_input(item: Any) -> bool:
    """A text, a list of texts (a pair, or a token task's words), or {column: text(s)}."""
    if isinstance(item, str):
        return True
    if isinstance(item, list):
        return all(isinstance(x, str) for x in item)
    if isinstance(item, dict):
        return all(
            isinstance(v, str) or valid_input(v) and isinstance(v, list) for v in item.values()
        )
    return False


def add_guards(app: FastAPI, config: ServeConfig) -> None:
    """API key (constant time) and body size before any route; JSON for every error."""
    limit = config.max_body_kb * 1024

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("x-api-key", "")
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                given = bearer[7:].strip()
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return error_response(
                    request,
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(request, 413, f"request body over {config.max_body_kb} KiB")
        return await call_next(request)

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception):
        return error_response(request, 500, f"internal error ({type(error).__name__}); see the log")

    @app.exception_handler(RoutingError)  # unknown path, wrong method: the same JSON shape
    async def routing_error(request: Request, error: RoutingError):
        return error_response(request, error.status_code, str(error.detail), error.headers)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, error: HTTPError):
        return error_response(request, error.status, error.message, error.headers, error.code)

    @app.exception_handler(MicrotuneError)
    async def bad_input(request: Request, error: MicrotuneError):
        return error_response(request, 422, str(error))


def add_routes(app: FastAPI) -> None:
    """Probes, metrics and the task list; then the inference and task routes."""
    engine: MultiTaskModel = app.state.engine
    metrics: Metrics = app.state.metrics

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not engine.tasks:
            raise HTTPError(503, "no task loaded")
        return {"status": "ready", "tasks": len(engine.tasks)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tasks")
    async def tasks():
        return {"tasks": [describe(task) for task in engine.tasks.values()]}

    add_inference_routes(app)
    add_task_routes(app)


def task_named(engine: MultiTaskModel, name: str):
    if name not in engine.tasks:
        raise HTTPError(404, f"unknown task '{name}'; GET /v1/tasks lists the tasks")
    return engine.tasks[name]


def add_inference_routes(app: FastAPI) -> None:
    """POST /v1/predict (through the batcher) and POST /v1/generate."""
    engine: MultiTaskModel = app.state.engine
    config: ServeConfig = app.state.config
    limit = config.max_body_kb * 1024

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = only_fields(await read_json(request, limit), "task", "inputs")
        name = request.state.task = field_of(body, "task", str, "a task name")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not 1 <= len(inputs) <= config.max_inputs:
            raise HTTPError(422, f'"inputs" must be a list of 1 to {config.max_inputs} inputs')
        wrong = next((i for i, item in enumerate(inputs) if not valid_input(item)), None)
        if wrong is not None:
            raise HTTPError(422, f"input {wrong} is not a text, a list of texts or an object")
        task_named(engine, name)
        encoded = await asyncio.to_thread(engine.encode, name, inputs)  # loop stays free
        with failures_as_500():
            results = await app.state.batcher.predict(encoded)
        return {"task": name, "outputs": results}

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = only_fields(await read_json(request, limit), "task", "prompts", "max_new_tokens")
        name = request.state.task = field_of(body, "task", str, "a task name")
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise HTTPError(422, '"prompts" must be a list of texts')
        if not 1 <= len(prompts) <= config.max_inputs:
            raise HTTPError(422, f'"prompts" must hold 1 to {config.max_inputs} texts')
        tokens = body.get("max_new_tokens", 64)
        if type(tokens) is not int or not 1 <= tokens <= config.max_new_tokens:  # no bool
            raise HTTPError(422, f'"max_new_tokens" must be 1 to {config.max_new_tokens}')
        task = task_named(engine, name)
        task.tuned.task_model.task_type.check_generates()
        batcher: Batcher = app.state.batcher
        with batcher.admit(), failures_as_500():
            if task.kind == "copy" and task.tuned.task_model.method is not None:
                results = await batcher.call(engine.generate, name, prompts, tokens)
            else:  # decoded with every other request's rows, continuously batched
                results = await decoded(request, task, prompts, tokens)
        return {"task": name, "outputs": results}


def prompt_ids(engine: MultiTaskModel, task, prompts: list[str]) -> list[list[int]]:
    with engine.tokenizer_lock:
        encode = task.tuned.task_model.task_type.encode_prompts
        return encode(engine.base.tokenizer, prompts, task.tuned.config["max_length"])


async def decoded(request: Request, task, prompts: list[str], tokens: int) -> list[dict]:
    """Greedy continuations through the decoder, as `microtune generate` gives them (prompts
    encoded and cut as it does; `CausalLM.generate`)."""
    engine: MultiTaskModel = request.app.state.engine
    decoder: Decoder = request.app.state.decoder
    ids = await asyncio.to_thread(prompt_ids, engine, task, prompts)
    positions = getattr(engine.base.model.config, "max_position_embeddings", None) or 1 << 30
    watch = Watch()
    rows = [Generation(task, p, min(tokens, positions - len(p)), notify=watch.notify) for p in ids]
    live = [row for row in rows if row.max_tokens > 0]  # no room left: nothing to continue
    for row in live:
        decoder.submit(row)
    await all_done(request, decoder, live, watch)
    return [{"prompt": p, "response": row.text} for p, row in zip(prompts, rows, strict=True)]


def add_task_routes(app: FastAPI) -> None:
    """Hot-loading (POST /v1/tasks, only under --artifact-root) and DELETE /v1/tasks/NAME."""
    engine: MultiTaskModel = app.state.engine
    config: ServeConfig = app.state.config
    metrics: Metrics = app.state.metrics
    limit = config.max_body_kb * 1024

    @app.post("/v1/tasks")
    async def load_task(request: Request):
        body = only_fields(await read_json(request, limit), "name", "path")
        path = field_of(body, "path", str, "an artifact folder under --artifact-root")
        folder = inside_root(config.artifact_root, path)
        name = body.get("name", folder.name)
        if not isinstance(name, str) or not name or "/" in name or len(name) > 200:
            raise HTTPError(422, '"name" must be a task name (no "/")')
        if name in engine.tasks:
            raise HTTPError(409, f"task '{name}' is already loaded; DELETE it first")
        with failures_as_500():
            task = await app.state.batcher.call(engine.add, folder, name)
        metrics.resident(engine)
        return JSONResponse(describe(task), status_code=201)

    @app.delete("/v1/tasks/{name}")
    async def delete_task(name: str):
        task_named(engine, name)
        await app.state.batcher.call(engine.remove, name)
        metrics.resident(engine)
        metrics.forget(name)
        return {"deleted": name}


def inside_root(root: str | None, path: str) -> Path:
    """The artifact folder `path` (relative to the root, or absolute) if it really is inside
    the root: no '..', no symlink out of it, nor of any file under it."""
    if root is None:
        raise HTTPError(403, "hot-loading is off; start the server with --artifact-root DIR")
    if ".." in Path(path).parts:
        raise HTTPError(403, f"'{path}' contains '..'; give a folder under the artifact root")
    base = Path(root).resolve()
    folder = (base / path).resolve()  # follows symlinks: a link out of the root lands outside
    if not folder.is_relative_to(base) or folder == base:
        raise HTTPError(403, f"'{path}' is not inside the artifact root {base}")
    if not folder.is_dir():
        raise HTTPError(404, f"no artifact folder '{path}' under the artifact root")
    try:
        check_inside(folder, base)  # every file read, not only the folder
    except MicrotuneError as error:
        raise HTTPError(403, f"'{path}' is not inside the artifact root {base}: {error}") from None
    return folder


def describe(task) -> dict[str, Any]:
    tuned = task.tuned
    return {
        "name": task.name,
        "method": task.method,
        "kind": task.kind,
        "task_type": tuned.task_model.task_type.name,
        "labels": None if tuned.is_regression else tuned.label_names,
        "resident_bytes": task.resident_bytes,
        "artifact_tensor_bytes": task.artifact_bytes,
    }


def bind(config: ServeConfig) -> socket.socket:
    """The listening socket (bound here, so port 0 gets a free port the caller can print), in
    listening state: a client that connects once `url_of` is printed is queued, not refused."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as error:
        sock.close()
        raise MicrotuneError(
            f"cannot listen on {config.host}:{config.port} ({error.strerror}); choose another "
            "--port or --host"
        ) from None
    return sock


def url_of(sock: socket.socket) -> str:
    """The base URL of a bound socket: an IPv6 host in brackets (http://[::1]:8000)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGINT/SIGTERM also ends every decoding row at once (each
    answered: a 503, or its stream's error event), so the drain waits for one decoding step and
    the classification batches in flight, never for the longest generation."""

    def __init__(self, config: uvicorn.Config, decoder: Decoder):
        super().__init__(config)
        self.decoder = decoder

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.decoder.close("the server is shutting down; send the request again", wait=False)
        super().handle_exit(sig, frame)


def serve(engine: MultiTaskModel, config: ServeConfig, sock: socket.socket) -> None:
    """Run the server on `sock` until SIGINT/SIGTERM (uvicorn drains in-flight requests)."""
    app = create_app(engine, config)
    settings = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
    DrainingServer(settings, app.state.decoder).run(sockets=[sock])


__all__ = [
    "Batcher",
    "HTTPError",
    "Metrics",
    "bind",
    "create_app",
    "inside_root",
    "serve",
    "url_of",
]
