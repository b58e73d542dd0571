"""What every route of the server shares: JSON errors in two shapes, the request body read
within its limit and checked against a typed model, and admission to the bounded queue.

Torch-free; the routes (`serving.routes`, `serving.openai_routes`) sit above it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

log = logging.getLogger("microtune.serving.http")
# Routes that answer errors in OpenAI's shape, {"error": {"message", "type", "code"}}, so that
# OpenAI clients raise their own typed exceptions; every other route answers {"error": message}.
OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
Model = TypeVar("Model", bound=BaseModel)


class HTTPError(Exception):
    """An answer with a status and a one-line JSON error (never a stack trace)."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.code = code


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict:
    """The error's JSON: OpenAI's shape on its routes, else {"error": message}."""
    if not path.startswith(OPENAI_PATHS):
        return {"error": message}
    kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(
    request: Request,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = error_body(request.url.path, status, message, code)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object (chunked bodies counted too): 413, 400 or 422 otherwise."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPError(413, f"request body over {limit // 1024} KiB")
    except ClientDisconnect:  # nobody to answer: one quiet line, never a traceback
        log.info("a client disconnected before its request body ended")
        raise HTTPError(400, "the client disconnected before the request body ended") from None
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTTPError(400, f"malformed JSON ({error})") from None
    except RecursionError:  # the parser recurses once per level: "[[[[...]]]]"
        raise HTTPError(400, "malformed JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise HTTPError(422, "the body must be a JSON object")
    try:  # "\udc80" escapes decode to lone surrogates, which no tokenizer takes
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise HTTPError(
            400, "the body holds a lone surrogate (\\uD800-\\uDFFF): not UTF-8 text"
        ) from None
    return value


def one_line(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's complaint as one line that names the field; an unknown field first (a typo
    would otherwise read as the missing field it misspells), with the fields `model` honours."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = json.dumps(".".join(str(part) for part in first["loc"]) or "the body")[:80]
    if first["type"] == "extra_forbidden":
        fields = f" (its fields: {', '.join(model.model_fields)})" if model else ""
        return f"{where} is not a field this endpoint honours{fields}; remove it"
    return f"{where}: {first['msg']}"


def checked(body: dict[str, Any], model: type[Model], status: int = 422) -> Model:
    """A body checked against its typed model: a wrong or unknown field is refused (`status`)
    in one line naming it, never ignored."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise HTTPError(status, one_line(error, model)) from None


async def parse_body(request: Request, limit: int, model: type[Model], status: int = 422) -> Model:
    """The body read within `limit` and checked against its typed model (`checked`)."""
    return checked(await read_json(request, limit), model, status)


class Admission:
    """The bounded number of requests waiting or running at once (predict and generation):
    beyond it, 503 with Retry-After instead of a queue without end."""

    def __init__(self, limit: int, retry_after_s: int, gauge: Callable[[int], None]):
        self.limit, self.retry_after_s, self.gauge = limit, retry_after_s, gauge
        self.admitted = 0

    def enter(self) -> Callable[[], None]:
        """A place, or 503; returns its release (calling it twice releases once)."""
        if self.admitted >= self.limit:
            raise HTTPError(
                503,
                f"the queue is full ({self.limit} requests); retry later",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.admitted += 1
        self.gauge(self.admitted)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1
                self.gauge(self.admitted)

        return release

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        release = self.enter()
        try:
            yield
        finally:
            release()


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a body the route reads itself (within the size limit); the
    models it refers to go to `SCHEMAS`, which the app's OpenAPI document adds to its own."""
    schema = model.model_json_schema(ref_template=REF)
    SCHEMAS.update(schema.pop("$defs", {}))
    SCHEMAS[model.__name__] = schema
    ref = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


REF = "#/components/schemas/{model}"
SCHEMAS: dict[str, Any] = {}  # request bodies' models, by name: what the routes refer to
