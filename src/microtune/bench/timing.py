"""Measurements side by side: interleaved timing with its spread, padding, versions, hardware.

Contenders are timed round by round (A, B, C, A, B, C, ...) so that each sees the same machine
state, and the report gives the median of the rounds with their minimum and maximum: a single
best-of-3 on a loaded machine can read 1.49× for two identical models.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import torch
from torch import nn

from microtune.tasks.data import Encoded, batches
from microtune.training.config import TrainConfig
from microtune.training.steps import AdamWStep
from microtune.version import __version__


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer reads work done rather than work launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Median, min, max (times `scale`) and the count of `values`."""
    return {
        "median": statistics.median(values) * scale,
        "min": min(values) * scale,
        "max": max(values) * scale,
        "n": len(values),
    }


def interleaved(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds of each contender's call, `rounds` times, contenders alternating within a round
    and the order rotating from round to round (so none always runs first); `warmup` untimed
    rounds first (allocator, kernels, caches)."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            call = contenders[name]
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            if index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def length_sorted_batches(
    rows: Sequence[Encoded], batch_size: int, pad_token_id: int, device: torch.device | str
) -> list[dict[str, torch.Tensor]]:
    """The rows in batches, longest first (as `train.predict` batches them), on `device`."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    out = batches(rows, [0] * len(rows), batch_size, pad_token_id, order)
    return [{k: v.to(device) for k, v in inputs.items()} for inputs, _ in out]


def inference_times(
    models: dict[str, nn.Module],
    inputs: list[dict[str, torch.Tensor]],
    rounds: int,
    device: torch.device | str,
) -> dict[str, Any]:
    """Seconds per pass over `inputs` (no grad, eval mode) of each model, interleaved; each
    model's spread and its median ÷ the first model's (the base)."""
    for model in models.values():
        model.eval()

    def forward_all(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                for batch in inputs:
                    model(**batch)

        return call

    seconds = interleaved({n: forward_all(m) for n, m in models.items()}, rounds, device)
    base = statistics.median(next(iter(seconds.values())))
    return {
        name: {**spread(values), "over_base": statistics.median(values) / base}
        for name, values in seconds.items()
    }


def step_vs_forward(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    rounds: int,
    learning_rate: float,
    device: torch.device | str,
) -> dict[str, Any]:
    """One training step (`train.AdamWStep`: forward, backward, AdamW) against one no-grad
    eval-mode forward of the same batch, interleaved; milliseconds and the ratio of medians.
    The step updates `model`: time it after everything else that reads the model."""

    step = AdamWStep()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    step.bind(model, trainable, TrainConfig(learning_rate=learning_rate, max_steps=1), 10**6)

    def train_step() -> None:
        step.train_mode(model)
        step(model, [(inputs, labels)], len(labels))

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs)

    seconds = interleaved({"step": train_step, "forward": forward}, rounds, device)
    step_ms, forward_ms = spread(seconds["step"], 1000), spread(seconds["forward"], 1000)
    return {
        "batch_shape": list(inputs["input_ids"].shape),
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "ratio": step_ms["median"] / forward_ms["median"],
    }


def padded_fraction(
    lengths: Sequence[int], logical_batches: Sequence[Sequence[int]], batch_size: int
) -> dict[str, float | int]:
    """Share of the token positions that are padding, over micro-batches of `batch_size` cut
    from each logical batch (each padded to its longest row, as `data.batches` pads)."""
    real = padded = 0
    for indices in logical_batches:
        for start in range(0, len(indices), batch_size):
            sizes = [lengths[i] for i in indices[start : start + batch_size]]
            real += sum(sizes)
            padded += max(sizes) * len(sizes)
    return {"fraction": 1 - real / padded if padded else 0.0, "tokens": padded}


def run_batches(sampler: Any, steps: int) -> list[list[int]]:
    """The first `steps` logical batches a run with this sampler trains on."""
    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        out += sampler.epoch(epoch)[: steps - len(out)]
        epoch += 1
    return out


def versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries that decide the numbers."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("microtune", "torch", "transformers", "peft", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None

    found["microtune"] = __version__  # the code that ran, even from a checkout
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device | str) -> dict[str, Any]:
    """The machine: CPU model, cores (all and usable), torch threads and CPU kernels (AVX512,
    AVX2: float rounding differs between them), GPU name."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    record = {
        "platform": sys.platform,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "gpu": None,
    }
    if torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record
