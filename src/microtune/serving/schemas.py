"""The typed bodies of the server's own routes (`serving.routes`): what each request may hold,
checked on arrival (`wire.checked`: a wrong or unknown field is a 422 naming it), and what each
answer holds; `/openapi.json` and `/docs` describe the routes with them.

Bounds set by the server's settings (`--max-inputs`, `--max-new-tokens`) and by the task (its
labels, for `top_k`) are checked by the routes, after these models. Torch-free.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError


class RequestBody(BaseModel):
    """A request body: a field the route does not honour is refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


def one_error(message: str) -> WrapValidator:
    """The field's own validation, failing with one message of ours (a union's would list a
    complaint per member)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid", message) from None

    return WrapValidator(validate)


def each_input(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The inputs checked, a wrong one named by its index ("input 2 is not ..."), in one line
    where a union would list a complaint per kind of input."""
    try:
        return handler(value)
    except ValidationError as error:
        where = error.errors()[0]["loc"]
        if not where or not isinstance(where[0], int):  # the list itself: not one, or empty
            raise
        raise PydanticCustomError(
            "invalid_input",
            "input {index} is not a text, a list of texts (a pair, a token task's words) or "
            "{column: text or texts}",
            {"index": where[0]},
        ) from None


Input = str | list[str] | dict[str, str | list[str]]
TaskName = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern="^[^/]*$"),
    one_error('must be a task name: 1 to 200 characters, no "/"'),
]


class PredictRequest(RequestBody):
    task: str = Field(description="a task name (GET /v1/tasks lists them)")
    inputs: Annotated[list[Input], WrapValidator(each_input)] = Field(
        min_length=1,
        description="1 to --max-inputs inputs, each a text, a list of texts (a sentence pair, "
        "or a token task's words) or {column: text or texts} with the task's columns",
    )
    top_k: StrictInt | None = Field(
        None,
        ge=1,
        description="classification only: per input, the k most probable labels with their "
        "scores, best first (1 to the task's number of labels; null: every label). Left out: "
        "the best label only",
    )


class GenerateRequest(RequestBody):
    task: str = Field(description="a causal-lm task's name (GET /v1/tasks lists them)")
    prompts: list[str] = Field(min_length=1, description="1 to --max-inputs texts")
    max_new_tokens: StrictInt = Field(64, ge=1, description="at most --max-new-tokens")


class LoadTaskRequest(RequestBody):
    path: str = Field(description="an artifact folder under --artifact-root (or relative to it)")
    name: TaskName | None = Field(None, description="the task's name (default: the folder's)")


class LabelScore(BaseModel):
    """A label and its softmax probability (regression: label null, score the prediction)."""

    model_config = ConfigDict(extra="allow")
    label: str | None
    score: float


class TokenTags(BaseModel):
    """A token task's answer: one tag and score per word (null: a word cut off by the
    artifact's max_length)."""

    model_config = ConfigDict(extra="allow")
    tokens: list[str]
    tags: list[str | None]
    scores: list[float | None]


# Per input: the best label; a token task's tags; with top_k, the k best labels (best first);
# or the record of a task type registered from outside (`register_task_type`).
Prediction = Annotated[
    LabelScore | TokenTags | list[LabelScore] | dict[str, Any],
    Field(union_mode="left_to_right"),
]


class PredictResponse(BaseModel):
    task: str
    outputs: list[Prediction] = Field(description="one per input, in order")


class Continuation(BaseModel):
    prompt: str
    response: str = Field(description="the greedy continuation (the prompt not repeated)")


class GenerateResponse(BaseModel):
    task: str
    outputs: list[Continuation] = Field(description="one per prompt, in order")


class TaskInfo(BaseModel):
    name: str
    method: str
    kind: str = Field(description='how it joins a mixed batch: "bias", "lora", "pafi" or "copy"')
    task_type: str
    labels: list[str] | None = Field(description="the label names (null: regression)")
    resident_bytes: int = Field(description="the memory the task holds beyond the shared base")
    artifact_tensor_bytes: int


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class Deleted(BaseModel):
    deleted: str = Field(description="the task's name")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    tasks: int = Field(description="tasks loaded")


class ErrorBody(BaseModel):
    error: str = Field(description="one line: the problem and the fix")


WHY = {
    400: "malformed JSON, or the client went before its body ended",
    401: "a missing or wrong API key",
    403: "hot-loading is off, or the path is not inside --artifact-root",
    404: "no such task (or artifact folder)",
    409: "the task is already loaded, or was replaced while the request waited",
    413: "the body is over --max-body-kb",
    422: "a field is missing, wrong, or not one the route honours (the error names it)",
    500: "the model failed on this request (the log has the traceback)",
    503: "the queue is full (Retry-After says when to retry)",
}


def errors(*statuses: int, why: dict[int, str] | None = None) -> dict[int | str, Any]:
    """OpenAPI `responses` for a route's error statuses, {"error": message} each (`why`: a
    route's own descriptions)."""
    reasons = {**WHY, **(why or {})}
    return {status: {"model": ErrorBody, "description": reasons[status]} for status in statuses}


__all__ = [
    "Deleted",
    "ErrorBody",
    "GenerateRequest",
    "GenerateResponse",
    "Health",
    "LoadTaskRequest",
    "PredictRequest",
    "PredictResponse",
    "Ready",
    "TaskInfo",
    "TaskList",
    "errors",
]
