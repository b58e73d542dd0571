"""`ModelOptions`: which base model a run loads and how its task reads it; free of torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.common.choices import DEFAULT_MODEL


@dataclass(frozen=True)
class ModelOptions:
    """The base model of a run, its precision and device, and the task head on top. Checked
    where each is used (`parse_dtype`, the task type's read-outs, `HeadConfig`), once."""

    name: str = field(default=DEFAULT_MODEL, metadata={"help": "hub id, local folder or GGUF"})
    dtype: str = field(default="float32", metadata={"help": "the frozen base's precision"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    max_length: int = field(default=128, metadata={"help": "tokens per example"})
    readout: str | None = field(
        default=None, metadata={"help": "first, mean, mask, last, pooler (None: the task's)"}
    )
    head_dropout: float = field(default=0.0, metadata={"help": "dropout before the head"})
    head_bias: bool | None = field(
        default=None, metadata={"help": "a bias in the linear head (None: the task type's)"}
    )
