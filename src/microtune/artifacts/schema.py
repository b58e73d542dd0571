"""The schema of `microtune.json`: every key, its type and its bounds, checked before use.

An artifact's config decides what gets built (the method's sizes, the head's width, the data
files `eval` reads), so it is validated in full before anything is allocated or opened:
strict types (a size given as a string or a bool is refused, never coerced), bounds, names
from the registries, task names and splits that cannot be paths. Unknown keys are refused:
the writer is `save_artifact` alone, and newer formats raise `format_version`, so an unknown
key means a hand edit or another tool, which must not pass silently. (The informative privacy
record is the one exception: nothing is computed from it, and it may gain fields.)

Every failure is one line: "<file>: <field path>: <problem>; re-train or restore the artifact".
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    model_validator,
)

from microtune.common.choices import DTYPE_NAMES, READOUTS
from microtune.common.records import Record, Sha256
from microtune.errors import MicrotuneError
from microtune.methods import method_class, method_names
from microtune.tasks.types import TASK_TYPES, recorded_metrics

# 2: config_sha256 is mandatory (issue 23: deleting it switched the check off). Version 1
# artifacts, written before it was, still load without one.
FORMAT_VERSION = 2
HASHED_SINCE = 2
FIX = "re-train or restore the artifact"
# A name that is used as a file name (task folder, split file): no separators, no "..".
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Generous sanity caps; the sizes that drive allocation are also bounded by the numbers the
# tensor file really stores (`check_sizes`), so a config cannot claim more than it ships.
MAX_LABELS = 1 << 20
MAX_LENGTH = 1 << 20
MAX_SEED = (1 << 63) - 1


def _not_dotted(name: str) -> str:
    if ".." in name:
        raise ValueError("must not contain '..'")
    return name


SafeName = Annotated[
    str, StringConstraints(pattern=SAFE_NAME, max_length=128), AfterValidator(_not_dotted)
]
Text = Annotated[str, StringConstraints(min_length=1, max_length=1000)]
Count = Annotated[int, Field(ge=0)]


def _one_of(allowed: typing.Iterable[str] | typing.Callable[[], typing.Iterable[str]], what: str):
    """A check against a fixed set of names, or a registry's names when the value is checked
    (so that a method or task type registered after import is known)."""

    def check(value: str) -> str:
        names = tuple(allowed() if callable(allowed) else allowed)
        if value not in names:
            raise ValueError(f"{what} '{value}' is unknown; use one of {', '.join(names)}")
        return value

    return AfterValidator(check)


class Counts(Record):
    head: Count
    method: Count
    total: Count

    @model_validator(mode="after")
    def _total(self) -> Counts:
        if self.total != self.head + self.method:
            raise ValueError(f"total {self.total} is not head + method")
        return self


class Parameters(Record):
    trained: Counts
    stored: Counts


class Head(Record):
    num_labels: Annotated[int, Field(ge=1, le=MAX_LABELS)]
    readout: Annotated[str, _one_of(READOUTS, "read-out")]
    head_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    bias: bool = True  # older artifacts: a head with a bias


class TaskInfo(Record):
    name: SafeName
    num_labels: Annotated[int, Field(ge=1, le=MAX_LABELS)]
    metrics: Annotated[
        list[Annotated[str, _one_of(recorded_metrics, "metric")]], Field(min_length=1)
    ]
    text_columns: Annotated[list[Text], Field(min_length=1, max_length=2)]
    # "" where the task has no label column (the causal LM: its labels are the text's tokens).
    label_column: Annotated[str, StringConstraints(max_length=1000)] = "label"
    label_names: Annotated[list[Text], Field(max_length=MAX_LABELS)] = []
    dev_split: SafeName = "validation"
    # Older artifacts name no type: regression for one label, else classification.
    type: Annotated[str, _one_of(lambda: TASK_TYPES, "task type")] | None = None

    @model_validator(mode="after")
    def _names(self) -> TaskInfo:
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label_names for {self.num_labels} labels")
        if not self.label_column and self.type != "causal-lm":
            raise ValueError(f"label_column is empty for task type {self.type or 'classification'}")
        return self


class BaseModelInfo(Record):
    name: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    model_type: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    dtype: Annotated[str, _one_of(DTYPE_NAMES, "dtype")] = "float32"  # absent in older artifacts
    fingerprint: Sha256
    tokenizer_fingerprint: Sha256 | None = None  # absent in older artifacts


class PrivacyRecord(BaseModel):
    """Informative only (nothing is computed from it); typed where present, may gain fields."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    epsilon: Annotated[float, Field(ge=0)]
    delta: Annotated[float, Field(ge=0, le=1)]
    sigma: Annotated[float, Field(ge=0)]
    clip: Annotated[float, Field(gt=0)]
    steps: Count
    noise_seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None


class ArtifactConfig(Record):
    """`microtune.json`, as `artifact.save_artifact` writes it."""

    format: Literal["microtune-artifact"]
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    library_version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    method: Annotated[str, _one_of(method_names, "method")]
    method_config: dict[str, Any]
    method_state: dict[str, Any] = {}  # absent in older artifacts
    parameters: Parameters | None = None  # absent in older artifacts
    head: Head
    task: TaskInfo
    max_length: Annotated[int, Field(ge=8, le=MAX_LENGTH)]
    base_model: BaseModelInfo
    privacy: PrivacyRecord | None = None
    # Informative: the federation that made the artifact (`microtune federate`), if one did.
    federated: dict[str, Any] | None = None
    tensors_sha256: Sha256
    config_sha256: Sha256 | None = None  # absent in format 1 only

    @model_validator(mode="after")
    def _hashed(self) -> ArtifactConfig:
        if self.config_sha256 is None and self.format_version >= HASHED_SINCE:
            raise ValueError(
                f"config_sha256 is missing, and every format {self.format_version} artifact "
                "carries it (it was deleted?)"
            )
        return self

    @model_validator(mode="after")
    def _head_fits_task(self) -> ArtifactConfig:
        if self.head.num_labels != self.task.num_labels:
            raise ValueError(
                f"head.num_labels {self.head.num_labels} differs from task.num_labels "
                f"{self.task.num_labels}"
            )
        return self


def _strict_model(config_class: type) -> type[BaseModel]:
    """A strict pydantic model with the fields and types of a method's config dataclass."""
    hints = typing.get_type_hints(config_class)
    fields = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(config_class)
    }
    return create_model(f"{config_class.__name__}Schema", __base__=Record, **fields)


@functools.cache
def _method_schema(name: str) -> type[BaseModel]:
    return _strict_model(method_class(name).config_class)


def problem(path: str | os.PathLike, field: str, text: str) -> MicrotuneError:
    """The one-line error for a bad field of an artifact file."""
    text = " ".join(str(text).split())  # one line, whatever the input held
    return MicrotuneError(f"{path}: {field or '(top level)'}: {text}; {FIX}")


def _first_error(path, error: ValidationError, prefix: tuple = ()) -> MicrotuneError:
    first = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in (*prefix, *first["loc"]))
    text = first["msg"].removeprefix("Value error, ")
    more = error.error_count() - 1
    return problem(path, field, text + (f" (and {more} more problems)" if more else ""))


def validate_config(data: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a parsed `microtune.json` against the schema; returns it unchanged.

    The method's options are checked with the types of its config dataclass and then by the
    dataclass itself (its `__post_init__` bounds); `method_state` by the method's record.
    """
    version = data.get("format_version") if isinstance(data, dict) else None
    if type(version) is int and version > FORMAT_VERSION:
        raise MicrotuneError(f"{path} has format version {version}; upgrade microtune")
    try:
        config = ArtifactConfig.model_validate(data)
    except ValidationError as error:
        raise _first_error(path, error) from None
    try:
        options = _method_schema(config.method).model_validate(config.method_config)
    except ValidationError as error:
        raise _first_error(path, error, ("method_config",)) from None
    try:
        method_class(config.method).config_class.from_dict(dict(options))
    except MicrotuneError as error:
        raise problem(path, "method_config", str(error)) from None
    state_schema = method_class(config.method).state_schema
    if state_schema is not None and config.method_state:
        try:
            state_schema.model_validate(config.method_state)
        except ValidationError as error:
            raise _first_error(path, error, ("method_state",)) from None
    elif state_schema is None and config.method_state:
        raise problem(path, "method_state", f"method '{config.method}' records no state")
    return data


def check_sizes(config: dict[str, Any], stored_numbers: int, path: str | os.PathLike) -> None:
    """Refuse sizes the tensor file cannot back, before anything of that size is allocated.

    Every size a config names (the head's labels, a method's d, rank, prompts, bottleneck...:
    its integer options other than seeds) shapes a tensor the artifact stores, so none can
    exceed the numbers the file holds; the file's size bounds those.
    """
    sizes = {"head.num_labels": config["head"]["num_labels"]}
    sizes.update(
        {
            f"method_config.{name}": value
            for name, value in config["method_config"].items()
            if type(value) is int and not name.endswith("_seed")
        }
    )
    for field, value in sizes.items():
        if value > stored_numbers:
            raise problem(
                path,
                field,
                f"{value} is more than the {stored_numbers} numbers the tensor file stores",
            )
