"""OpenAI-compatible routes for the server's causal-lm tenants: `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions`, streamed as server-sent events or not.

The request's `model` names a task (or the base model itself, listed as every task's parent),
so any OpenAI client picks a tenant as it picks a model. Every row decodes through the shared
`Decoder` (continuous batching; rows of different tasks share each decoding step). Errors come
in OpenAI's shape (`serving.wire`); a field these routes do not honour is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from starlette.background import BackgroundTask

from microtune.errors import MicrotuneError
from microtune.serving.decoding import (
    Decoder,
    Generation,
    Sampling,
    Watch,
    all_done,
    causal_parts,
    error_of,
)
from microtune.serving.multitask import MultiTaskModel, ResidentTask
from microtune.serving.wire import HTTPError, error_body, parse_body, request_schema


def not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


Number = Annotated[float, BeforeValidator(not_bool)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: StrictBool = False


class Sampled(Strict):
    """The fields both generation routes share."""

    model: str = Field(description="a task name (GET /v1/models), or the base model's name")
    temperature: Number = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, description="the same seed, the same sampled text")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per prompt")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise HTTPError(400, '"stop" takes up to 4 non-empty strings')
        return tuple(stops)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


class CompletionRequest(Sampled):
    prompt: str | list[str] = Field(description="a text, or a list of texts (one choice each)")
    max_tokens: StrictInt = Field(16, ge=1)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "microtune"
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def base_name(engine: MultiTaskModel) -> str:
    return engine.model_name or engine.base.name or "base"


def model_list(engine: MultiTaskModel) -> ModelList:
    """The base model (when it can generate), then every task with the base as its parent."""
    base = base_name(engine)
    cards = [ModelCard(id=base, root=base, parent=None)] if causal_parts(engine.base.model) else []
    cards += [ModelCard(id=name, root=base, parent=base) for name in engine.tasks]
    return ModelList(data=cards)


def resolve_model(engine: MultiTaskModel, name: str) -> ResidentTask | None:
    """The task `name` names (None: the base model itself), or a 404 / 400."""
    task = engine.tasks.get(name)
    if task is None and name != base_name(engine):
        raise HTTPError(
            404, f"no model '{name}'; GET /v1/models lists them", code="model_not_found"
        )
    try:
        if task is None and causal_parts(engine.base.model) is None:
            raise MicrotuneError(f"the base model '{name}' is not a causal LM; it cannot generate")
        if task is not None:
            task.tuned.task_model.task_type.check_generates()
    except MicrotuneError as error:
        raise HTTPError(400, f"model '{name}': {error}") from None
    return task


def encode_prompt(engine: MultiTaskModel, task: ResidentTask | None, prompt) -> list[int]:
    """A prompt's tokens as `microtune generate` encodes them (a chat: the base's chat template),
    refused when empty or longer than the task's max_length."""
    tokenizer = engine.base.tokenizer
    with engine.tokenizer_lock:
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=True).input_ids
        elif not getattr(tokenizer, "chat_template", None):
            raise HTTPError(400, "this model has no chat template; use POST /v1/completions")
        else:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
    limit = context_size(engine, task)
    if not ids:
        raise HTTPError(400, "the prompt is empty; give some text to continue")
    if len(ids) > limit:
        raise HTTPError(
            400,
            f"the prompt has {len(ids)} tokens, over this model's {limit}; shorten it",
            code="context_length_exceeded",
        )
    return ids


def context_size(engine: MultiTaskModel, task: ResidentTask | None) -> int:
    positions = getattr(engine.base.model.config, "max_position_embeddings", None) or 1 << 30
    return positions if task is None else min(positions, task.tuned.config["max_length"])


class Reply:
    """One generation request in flight: its rows, and how its answer is shaped."""

    def __init__(self, request: Request, body: Sampled, chat: bool, rows: list[Generation]):
        self.request, self.body, self.chat, self.rows = request, body, chat, rows
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.decoder: Decoder = request.app.state.decoder

    def usage(self) -> Usage:
        prompt = sum(len(r.prompt_ids) for r in self.rows)
        completion = sum(len(r.tokens) for r in self.rows)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def cancel_unfinished(self) -> None:
        for row in self.rows:
            if not row.done:
                self.decoder.cancel(row)

    async def finished(self, watch: Watch) -> dict[str, Any]:
        """The whole answer, once every row is done (the rows end early if the client goes)."""
        await all_done(self.request, self.decoder, self.rows, watch)
        return self.whole().model_dump()

    def whole(self) -> Completion | ChatCompletion:
        head = {"id": self.id, "created": self.created, "model": self.body.model}
        if self.chat:
            choices = [
                ChatChoice(
                    index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason
                )
                for i, r in enumerate(self.rows)
            ]
            return ChatCompletion(**head, choices=choices, usage=self.usage())
        choices = [
            CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
            for i, r in enumerate(self.rows)
        ]
        return Completion(**head, choices=choices, usage=self.usage())

    def chunk(self, index: int, text: str | None, finish: str | None, first=False) -> str:
        """One server-sent event: a piece of text of row `index` (or its end; `first`: a chat
        row's opening, its role)."""
        head = {"id": self.id, "created": self.created, "model": self.body.model}
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "object": "text_completion", "choices": [choice]})

    async def events(self, watch: Watch, release: Callable[[], None]) -> AsyncIterator[str]:
        """The stream: text as it settles, each row's end, usage if asked, then [DONE]. A
        client that goes away cancels its rows (they leave the batch at the next step)."""
        sent = [""] * len(self.rows)
        ended: set[int] = set()
        index = {id(row): i for i, row in enumerate(self.rows)}
        try:
            if self.chat:
                for i in range(len(self.rows)):
                    yield self.chunk(i, "", None, first=True)
            while len(ended) < len(self.rows):
                row = await watch.queue.get()
                i = index[id(row)]
                if row.error:
                    error = error_of(row)
                    yield sse(error_body(self.request.url.path, error.status, error.message))
                    break
                text = row.settled_text()
                if len(text) > len(sent[i]):
                    yield self.chunk(i, text[len(sent[i]) :], None)
                    sent[i] = text
                if row.done and i not in ended:
                    ended.add(i)
                    yield self.chunk(i, None, row.finish_reason)
            options = self.body.stream_options
            if options is not None and options.include_usage:
                usage = self.usage().model_dump()
                yield sse({"id": self.id, "created": self.created, "model": self.body.model,
                           "object": "chat.completion.chunk" if self.chat else "text_completion",
                           "choices": [], "usage": usage})  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:
            self.cancel_unfinished()
            release()


def sse(value: dict[str, Any]) -> str:
    return f"data: {json.dumps(value)}\n\n"


async def answer(request: Request, body: Sampled, prompts: list, chat: bool):
    """Admit, encode and submit the prompts; the whole answer, or its stream."""
    app = request.app
    engine: MultiTaskModel = app.state.engine
    request.state.task = body.model
    task = resolve_model(engine, body.model)
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    cap = app.state.config.max_new_tokens
    if max_tokens is not None and max_tokens > cap:
        raise HTTPError(400, f'"max_tokens" must be at most {cap} (--max-new-tokens)')
    ids = [await asyncio.to_thread(encode_prompt, engine, task, p) for p in prompts]
    release = app.state.batcher.admission.enter()
    watch, stops, context = Watch(), body.stops(), context_size(engine, task)
    rows = [
        Generation(task, p, min(max_tokens or cap, context - len(p)), stops, body.sampling(),
                   watch.notify, watch)
        for p in ids
    ]  # fmt: skip
    reply = Reply(request, body, chat, rows)
    try:
        for row in rows:
            app.state.decoder.submit(row)
    except MicrotuneError as error:
        reply.cancel_unfinished()
        release()
        raise HTTPError(503, str(error)) from None
    if body.stream:
        stream = reply.events(watch, release)
        return StreamingResponse(
            stream, media_type="text/event-stream", background=BackgroundTask(release)
        )
    try:
        return await reply.finished(watch)
    finally:
        release()


def add_openai_routes(app: FastAPI) -> None:
    """GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""
    engine: MultiTaskModel = app.state.engine
    limit = app.state.config.max_body_kb * 1024
    streamed = {"text/event-stream": {"schema": {"type": "string"}}}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return model_list(engine)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        openapi_extra=request_schema(CompletionRequest),
        responses={200: {"content": streamed}},
    )
    async def completions(request: Request):
        body = await parse_body(request, limit, CompletionRequest, status=400)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise HTTPError(400, '"prompt" is an empty list; give at least one text')
        return await answer(request, body, prompts, chat=False)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        openapi_extra=request_schema(ChatRequest),
        responses={200: {"content": streamed}},
    )
    async def chat_completions(request: Request):
        body = await parse_body(request, limit, ChatRequest, status=400)
        messages = [m.model_dump() for m in body.messages]
        return await answer(request, body, [messages], chat=True)


__all__ = ["add_openai_routes", "model_list"]
