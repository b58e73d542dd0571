"""`microtune serve`: many tasks on one base model over HTTP (FastAPI on uvicorn).

The app (`create_app`): the API key and the body limit before any route, JSON errors for every
failure (never a traceback), every inference answer counted in `/metrics`; the server's own
routes (`serving.routes`, their bodies typed in `serving.schemas`) and the OpenAI-compatible
ones (`serving.openai_routes`) on one port, described by `/openapi.json` and shown at `/docs`.
Requests wait in the bounded queue of `serving.batcher`; generation decodes through one shared
`Decoder`. uvicorn's graceful shutdown drains: it stops accepting, and the batcher keeps running
until every in-flight request has its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as RoutingError

from microtune.errors import MicrotuneError
from microtune.serving.batcher import Batcher, Metrics
from microtune.serving.config import ServeConfig
from microtune.serving.decoding import Decoder
from microtune.serving.multitask import MultiTaskModel
from microtune.serving.openai_routes import add_openai_routes
from microtune.serving.routes import add_routes
from microtune.serving.wire import SCHEMAS, HTTPError, error_response
from microtune.version import __version__

INFERENCE_PATHS = (
    "/v1/predict",
    "/v1/generate",
    "/v1/completions",
    "/v1/chat/completions",
)  # counted by task and status in /metrics
OPEN_PATHS = ("/health", "/docs", "/openapi.json")  # no API key: liveness, the API's description


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


__all__ = ["bind", "create_app", "serve", "url_of"]
