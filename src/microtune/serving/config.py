"""Settings of `microtune serve` (`ServeConfig`), free of torch so that the command line builds
its options from this dataclass (`microtune.cli.options`) without loading the heavy stack."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from microtune.errors import MicrotuneError

API_KEY_VARIABLE = "MICROTUNE_API_KEY"  # read when --api-key is not given


@dataclass
class ServeConfig:
    """How the server listens, batches and guards itself. Help texts in field metadata."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to bind (loopback by default; 0.0.0.0 exposes the server)."},
    )
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)."})
    max_batch_size: int = field(
        default=32, metadata={"help": "rows (inputs of any tasks) per forward pass."}
    )
    max_wait_ms: float = field(
        default=5.0,
        metadata={"help": "how long a batch waits for more requests before it runs (ms)."},
    )
    max_queue: int = field(
        default=256,
        metadata={
            "help": "requests waiting or running at once; beyond it the server answers 503 "
            "with Retry-After instead of queueing."
        },
    )
    max_inputs: int = field(default=64, metadata={"help": "inputs in one request at most."})
    max_body_kb: int = field(
        default=1024, metadata={"help": "request body size at most (KiB); larger is 413."}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "tokens one /v1/generate request may ask for at most."}
    )
    max_copy_mb: int = field(
        default=0,
        metadata={
            "help": "memory for tasks whose method cannot join a mixed batch (each holds its "
            "own copy of the base, MiB); 0 refuses them."
        },
    )
    artifact_root: str | None = field(
        default=None,
        metadata={
            "help": "folder whose artifacts POST /v1/tasks may hot-load (none: hot-loading is "
            "off); paths outside it, symlinks out of it and '..' are refused."
        },
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"key every request but /health must send (Authorization: Bearer KEY or "
            f"X-API-Key); default: ${API_KEY_VARIABLE} if set, else no key.",
            "flag": "--api-key",
        },
    )
    retry_after_s: int = field(
        default=1, metadata={"help": "the Retry-After (seconds) of a 503 when the queue is full."}
    )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_inputs", "max_body_kb", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise MicrotuneError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise MicrotuneError("--max-wait-ms must be in [0, 60000]")
        if not 0 <= self.port <= 65535:
            raise MicrotuneError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_copy_mb < 0 or self.retry_after_s < 0:
            raise MicrotuneError("--max-copy-mb and --retry-after-s must be at least 0")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_VARIABLE) or None
        if self.api_key is not None and not self.api_key.strip():
            raise MicrotuneError("--api-key is empty; give a key or leave it out")
