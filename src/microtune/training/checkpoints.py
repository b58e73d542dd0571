"""Checkpoints of the trainer, and what must not change between a run and its resumption.

A checkpoint is one safetensors file (tensors plus JSON metadata), written atomically, that
holds everything needed to continue bit for bit: the trainable tensors, what the step owns
(optimizer state; DP's noise generator), every rank's RNG state and the position in the data
stream. A torn or edited file is refused in one line (`--overwrite` starts over).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from microtune.common.files import write_tensors
from microtune.errors import MicrotuneError
from microtune.training.config import TrainConfig
from microtune.training.distributed import World

if TYPE_CHECKING:
    from microtune.training.steps import AdamWStep

# Settings that may differ between a run and its resumption: they do not change the result.
# (Activation checkpointing recomputes the same blocks: it changes memory, not the numbers, so a
# run that ran out of memory may resume with it on.)
_RESUMABLE = (
    "progress",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "eval_batch_size",
    "gradient_checkpointing",
)


def resume_signature(run_signature: dict | None, config: TrainConfig, world: World) -> dict:
    """What must not change between a run and its resumption (method, head, base model...)."""
    train = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE}
    if train["lr_schedule"] == "linear":
        del train["lr_schedule"]  # the default, as checkpoints written before the option say
    return {
        **(run_signature or {}),
        "train_config": train,
        # Each process's RNG state and data share depend on how many there are.
        **({"processes": world.size} if world.size > 1 else {}),
    }


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states, as a checkpoint holds them."""
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    return rng


def write_checkpoint(
    path: Path,
    parameters: dict[str, nn.Parameter],
    step: AdamWStep,
    every_rng: list[dict[str, torch.Tensor]],
    loop_state: dict[str, Any],
) -> None:
    """Write the checkpoint: the trainable tensors, the step's state, every rank's RNG state
    (`rng_state`, by rank) and `loop_state` (step, epoch, batch_in_epoch, run_signature and
    last_metrics of the loop)."""
    step_tensors, step_meta = step.state()
    tensors = {f"model.{n}": p for n, p in parameters.items()}
    tensors.update({f"step.{k}": v for k, v in step_tensors.items()})
    for rank, states in enumerate(every_rng):
        tensors.update({_rank_key(key, rank): state for key, state in states.items()})
    meta = {
        "step": loop_state["step"],
        "epoch": loop_state["epoch"],
        "batch_in_epoch": loop_state["batch_in_epoch"],
        "step_plugin": step_meta,
        "param_shapes": _shapes(parameters),
        "run_signature": loop_state["run_signature"],
        "last_metrics": loop_state["last_metrics"],
    }
    write_tensors(path, tensors, metadata={"json": json.dumps(meta)})


def read_checkpoint(
    path: Path, parameters: dict[str, nn.Parameter], rank: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the checkpoint, with every entry that resuming `rank` needs."""
    try:
        with safe_open(path, framework="pt") as handle:
            meta = json.loads(handle.metadata()["json"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        keys = ("step", "epoch", "batch_in_epoch", "step_plugin", "param_shapes")
        missing = [k for k in (*keys, "run_signature", "last_metrics") if k not in meta]
        needed = (_rank_key("rng.torch", rank), *(f"model.{n}" for n in parameters))
        missing += [k for k in needed if k not in tensors]
        if missing:
            raise ValueError(f"missing {', '.join(missing[:3])}")
    except Exception as error:  # whatever a torn or edited file raises: one line
        raise _unreadable(path, error) from None
    return meta, tensors


def check_same_run(
    path: Path, meta: dict[str, Any], run_signature: dict, parameters: dict[str, nn.Parameter]
) -> None:
    """Refuse a checkpoint written by a run with other settings or trainable tensors."""
    changed = _differences(meta["run_signature"], run_signature)
    if changed or meta["param_shapes"] != _shapes(parameters):
        raise MicrotuneError(
            f"{path} was written by a run with other settings "
            f"({', '.join(changed) or 'trainable parameters'}); resume with the same "
            "command, or pass --overwrite to start over"
        )


def restore_checkpoint(
    path: Path,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    parameters: dict[str, nn.Parameter],
    step: AdamWStep,
    rank: int,
) -> None:
    """Load the trainable tensors, the step's state and `rank`'s RNG state."""
    try:
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(tensors[f"model.{name}"])
        step_tensors = {k[len("step.") :]: v for k, v in tensors.items() if k.startswith("step.")}
        step.load_state(step_tensors, meta["step_plugin"])
        torch.set_rng_state(tensors[_rank_key("rng.torch", rank)])
        cuda_rng = _rank_key("rng.cuda", rank)
        if cuda_rng in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[cuda_rng])
    except Exception as error:  # an edited file: entries of the wrong shape or type
        raise _unreadable(path, error) from None


def trim_log(path: Path, step: int) -> None:
    """After a resume, drop log lines from steps the crashed run did past its checkpoint."""
    if path.is_file():
        kept = [
            line
            for line in path.read_text().splitlines()
            if _log_step(line) is not None and _log_step(line) <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))


def _shapes(parameters: dict[str, nn.Parameter]) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in parameters.items()}


def _unreadable(path: Path, error: Exception) -> MicrotuneError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return MicrotuneError(
        f"checkpoint {path} is unreadable ({reason}); "
        "pass --overwrite instead of --resume to start over"
    )


def _rank_key(key: str, rank: int) -> str:
    """A per-rank checkpoint entry's name; rank 0 keeps the one-process name."""
    return key if rank == 0 else f"{key}.{rank}"


def _log_step(line: str) -> int | None:
    """The step of a JSONL log line; None for a line torn by a crash mid-write."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return None


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two nested dicts."""
    names = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names
