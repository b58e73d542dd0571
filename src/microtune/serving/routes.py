"""The server's own routes: `POST /v1/predict` (through the batcher; `top_k`: every label's
score), `POST /v1/generate`, `GET`/`POST /v1/tasks` (hot-load, only under `--artifact-root`),
`DELETE /v1/tasks/{name}`, `GET /health` (live), `GET /ready` (tasks loaded), `GET /metrics`.

Each body is read within the size limit and checked against its model (`serving.schemas`): a
field a route does not honour (`temperature`, `stream`) is refused with 422 naming it, never
ignored; `/openapi.json` describes every request and answer with the same models.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from microtune.common.files import check_inside
from microtune.errors import MicrotuneError
from microtune.serving.batcher import Batcher, Metrics, failures_as_500
from microtune.serving.config import ServeConfig
from microtune.serving.decoding import Decoder, Generation, Watch, all_done
from microtune.serving.multitask import MultiTaskModel, ResidentTask
from microtune.serving.schemas import (
    Deleted,
    GenerateRequest,
    GenerateResponse,
    Health,
    LoadTaskRequest,
    PredictRequest,
    PredictResponse,
    Ready,
    TaskInfo,
    TaskList,
    errors,
)
from microtune.serving.wire import HTTPError, Model, checked, read_json, request_schema

INFERENCE_ERRORS = errors(400, 401, 404, 409, 413, 422, 500, 503)


def add_routes(app: FastAPI) -> None:
    """Probes, metrics and the task list; then the inference and task routes."""
    engine: MultiTaskModel = app.state.engine
    metrics: Metrics = app.state.metrics

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health()

    @app.get(
        "/ready",
        response_model=Ready,
        responses=errors(401, 503, why={503: "no task loaded yet"}),
    )
    async def ready() -> Ready:
        if not engine.tasks:
            raise HTTPError(503, "no task loaded")
        return Ready(tasks=len(engine.tasks))

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors(401))
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tasks", response_model=TaskList, responses=errors(401))
    async def tasks() -> TaskList:
        return TaskList(tasks=[describe(task) for task in engine.tasks.values()])

    add_predict_route(app)
    add_generate_route(app)
    add_task_routes(app)


async def parse_request(request: Request, model: type[Model]) -> Model:
    """The body within the size limit, checked against `model` (422 naming the field); counted
    under its task (`/metrics`) even when refused."""
    limit = request.app.state.config.max_body_kb * 1024
    body = await read_json(request, limit)
    if isinstance(body.get("task"), str):
        request.state.task = body["task"]
    return checked(body, model)


def task_named(engine: MultiTaskModel, name: str) -> ResidentTask:
    if name not in engine.tasks:
        raise HTTPError(404, f"unknown task '{name}'; GET /v1/tasks lists the tasks")
    return engine.tasks[name]


def ranked_labels(task: ResidentTask, body: PredictRequest) -> int | None:
    """How many labels each input's answer ranks: None (top_k left out: the best label), else
    `top_k` (null: every label), checked against the task's labels."""
    if "top_k" not in body.model_fields_set:
        return None
    try:
        task.tuned.task_model.task_type.check_ranks()
    except MicrotuneError as error:
        raise HTTPError(422, f'"top_k": {error}; leave it out') from None
    count = len(task.tuned.label_names)
    if body.top_k is not None and body.top_k > count:
        raise HTTPError(
            422, f'"top_k" must be 1 to {count} (the task\'s labels), or null for every label'
        )
    return count if body.top_k is None else body.top_k


def add_predict_route(app: FastAPI) -> None:
    """POST /v1/predict: rows of every task's requests batched together (`Batcher`)."""
    engine: MultiTaskModel = app.state.engine
    config: ServeConfig = app.state.config

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        openapi_extra=request_schema(PredictRequest),
        responses=INFERENCE_ERRORS,
    )
    async def predict(request: Request) -> dict[str, Any]:
        body = await parse_request(request, PredictRequest)
        if len(body.inputs) > config.max_inputs:
            raise HTTPError(422, f'"inputs" must be a list of 1 to {config.max_inputs} inputs')
        task = task_named(engine, body.task)
        top_k = ranked_labels(task, body)
        encoded = await asyncio.to_thread(engine.encode, body.task, body.inputs)  # loop free
        encoded = dataclasses.replace(encoded, top_k=top_k)
        batcher: Batcher = app.state.batcher
        with failures_as_500():
            results = await batcher.predict(encoded)
        return {"task": body.task, "outputs": results}


def add_generate_route(app: FastAPI) -> None:
    """POST /v1/generate: greedy continuations of a causal-lm task's prompts."""
    engine: MultiTaskModel = app.state.engine
    config: ServeConfig = app.state.config

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        openapi_extra=request_schema(GenerateRequest),
        responses=INFERENCE_ERRORS,
    )
    async def generate(request: Request) -> dict[str, Any]:
        body = await parse_request(request, GenerateRequest)
        if len(body.prompts) > config.max_inputs:
            raise HTTPError(422, f'"prompts" must hold 1 to {config.max_inputs} texts')
        if body.max_new_tokens > config.max_new_tokens:
            raise HTTPError(422, f'"max_new_tokens" must be 1 to {config.max_new_tokens}')
        task = task_named(engine, body.task)
        task.tuned.task_model.task_type.check_generates()
        batcher: Batcher = app.state.batcher
        with batcher.admit(), failures_as_500():
            if task.kind == "copy" and task.tuned.task_model.method is not None:
                generate = engine.generate
                results = await batcher.call(generate, body.task, body.prompts, body.max_new_tokens)
            else:  # decoded with every other request's rows, continuously batched
                results = await decoded(request, task, body.prompts, body.max_new_tokens)
        return {"task": body.task, "outputs": results}


def prompt_ids(engine: MultiTaskModel, task: ResidentTask, prompts: list[str]) -> list[list[int]]:
    with engine.tokenizer_lock:
        encode = task.tuned.task_model.task_type.encode_prompts
        return encode(engine.base.tokenizer, prompts, task.tuned.config["max_length"])


async def decoded(
    request: Request, task: ResidentTask, prompts: list[str], tokens: int
) -> list[dict[str, str]]:
    """Greedy continuations through the decoder, as `microtune generate` gives them (prompts
    encoded and cut as it does; `CausalLM.generate`)."""
    engine: MultiTaskModel = request.app.state.engine
    decoder: Decoder = request.app.state.decoder
    ids = await asyncio.to_thread(prompt_ids, engine, task, prompts)
    positions = getattr(engine.base.model.config, "max_position_embeddings", None) or 1 << 30
    watch = Watch()
    rows = [
        Generation(task, p, min(tokens, positions - len(p)), notify=watch.notify, request=watch)
        for p in ids
    ]
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

    @app.post(
        "/v1/tasks",
        status_code=201,
        response_model=TaskInfo,
        openapi_extra=request_schema(LoadTaskRequest),
        responses=errors(400, 401, 403, 404, 409, 413, 422, 500),
    )
    async def load_task(request: Request) -> TaskInfo:
        body = await parse_request(request, LoadTaskRequest)
        folder = inside_root(config.artifact_root, body.path)
        name = body.name or folder.name
        if name in engine.tasks:
            raise HTTPError(409, f"task '{name}' is already loaded; DELETE it first")
        with failures_as_500():
            task = await app.state.batcher.call(engine.add, folder, name)
        metrics.resident(engine)
        return describe(task)

    @app.delete("/v1/tasks/{name}", response_model=Deleted, responses=errors(401, 404))
    async def delete_task(name: str) -> Deleted:
        task_named(engine, name)
        await app.state.batcher.call(engine.remove, name)
        metrics.resident(engine)
        metrics.forget(name)
        return Deleted(deleted=name)


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


def describe(task: ResidentTask) -> TaskInfo:
    tuned = task.tuned
    return TaskInfo(
        name=task.name,
        method=task.method,
        kind=task.kind,
        task_type=tuned.task_model.task_type.name,
        labels=None if tuned.is_regression else tuned.label_names,
        resident_bytes=task.resident_bytes,
        artifact_tensor_bytes=task.artifact_bytes,
    )


__all__ = ["add_routes", "inside_root"]
