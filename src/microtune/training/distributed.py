"""Training past one process: the process group that `torchrun` or `accelerate launch` starts.

Both launchers set the same environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`); `World.from_env` reads it and `World.start` joins the group (gloo on the CPU,
nccl on GPUs). Everything the trainer exchanges goes through `World`: the all-reduce of the
trainable tensors' gradients (one flat buffer per step), the broadcast of rank 0's decisions
and tensors, and the gather of each rank's RNG state for checkpoints. A collective that fails
because another process died becomes one `MicrotuneError` line, never a traceback or a hang;
a worker a launcher started dies with the launcher (`die_with_launcher`), never an orphan.

A plain `python -m microtune` run is a world of one: every method returns at once, unchanged.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from microtune.errors import MicrotuneError

T = TypeVar("T")
# How long a rank waits in a collective for the others (rank 0 evaluating, say) before it gives
# up; a dead peer is noticed at once on gloo, whatever this says.
DEFAULT_TIMEOUT_S = 1800
# How long the processes have to find each other at the start (MICROTUNE_DIST_JOIN_TIMEOUT_S):
# a launcher starts them together, so a peer missing after this means no launcher started it
# (stale launcher variables in a plain run's environment).
DEFAULT_JOIN_TIMEOUT_S = 60
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Set by torchrun (and accelerate launch, which runs torchrun's machinery) in each worker's
# environment: the worker's parent is then the launcher, and outliving it is never wanted.
LAUNCHER_VARIABLE = "TORCHELASTIC_RUN_ID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise MicrotuneError(f"{name}={value!r} is not a number; launch with torchrun") from None


@dataclass
class World:
    """This process's place among the training processes, and what they exchange.

    Attributes:
        rank: this process's index (0 logs, evaluates and writes).
        size: how many processes train together.
        local_rank: its index on this machine (picks its GPU).
        bytes_reduced: bytes this process has all-reduced so far (the bench reads it).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    bytes_reduced: int = field(default=0, compare=False)

    @classmethod
    def from_env(cls) -> World:
        """The world the launcher describes in the environment; one process without one."""
        size = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if size < 1 or not 0 <= rank < size:
            raise MicrotuneError(
                f"RANK={rank} and WORLD_SIZE={size} disagree; launch with torchrun"
            )
        return cls(rank=rank, size=size, local_rank=local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device of this rank: each process of a GPU node takes the GPU of its local rank."""
        if self.size > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def start(self, device: torch.device) -> bool:
        """Join the process group (nccl for GPUs, gloo for the CPU); False when nothing was to
        start (one process, or a group the caller already runs)."""
        if self.size == 1 or dist.is_initialized():
            return False
        die_with_launcher()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(
            seconds=_env_int("MICROTUNE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)
        )
        join_s = _env_int("MICROTUNE_DIST_JOIN_TIMEOUT_S", DEFAULT_JOIN_TIMEOUT_S)
        store = self._join(join_s)
        self._guard(
            lambda: dist.init_process_group(
                backend, store=store, rank=self.rank, world_size=self.size, timeout=timeout
            )
        )
        store.set_timeout(timeout)  # joined: from now on, the collectives' patience
        return True

    def _join(self, join_s: int) -> dist.Store:
        """Meet the other processes at MASTER_ADDR:MASTER_PORT within `join_s` seconds; none
        there means stale launcher variables in a plain run: one line saying which to unset."""
        try:
            rendezvous = dist.rendezvous("env://", timeout=datetime.timedelta(seconds=join_s))
            store, _, _ = next(rendezvous)
            return store
        except (RuntimeError, ValueError) as error:  # DistStoreError, a missing variable
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise MicrotuneError(
                f"training process {self.rank} of {self.size} found no other process at "
                f"{where} within {join_s} s ({_first_sentence(error)}); outside torchrun or "
                f"accelerate launch, unset {' '.join(LAUNCH_VARIABLES)} (stale launcher "
                "variables), else start every rank or raise MICROTUNE_DIST_JOIN_TIMEOUT_S"
            ) from None

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def group(self, device: torch.device) -> Iterator[World]:
        """The process group for the block: joined here and left at its end, unless there is
        one process or the caller runs the group (a script training several times in it)."""
        joined = self.start(device)
        try:
            yield self
        finally:
            if joined:
                self.stop()

    # -- what the trainer exchanges ----------------------------------------------------------

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's share of a logical batch: its contiguous block (sizes differing by at
        most one), so a length-grouped batch stays length-grouped on every rank, and N ranks
        cut a batch as one process's N micro-batches would."""
        size, extra = divmod(len(indices), self.size)
        start = self.rank * size + min(self.rank, extra)
        return list(indices[start : start + size + (self.rank < extra)])

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The sums over all ranks of these tensors (one flat float32 all-reduce)."""
        if self.size == 1:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        self.bytes_reduced += flat.numel() * flat.element_size()
        self._guard(lambda: dist.all_reduce(flat))
        out, start = [], 0
        for tensor in tensors:
            out.append(flat[start : start + tensor.numel()].view_as(tensor).to(tensor.dtype))
            start += tensor.numel()
        return out

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite these tensors with rank 0's values, in place."""
        if self.size > 1:
            with torch.no_grad():
                for tensor in tensors:
                    self._guard(lambda t=tensor: dist.broadcast(t.data, src=0))

    def from_main(self, value: T) -> T:
        """Rank 0's value of a small picklable object, on every rank."""
        if self.size == 1:
            return value
        holder = [value]
        self._guard(lambda: dist.broadcast_object_list(holder, src=0))
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value of a small picklable object, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        self._guard(lambda: dist.all_gather_object(out, value))
        return out

    def _guard(self, collective: Callable[[], Any]) -> Any:
        """Run a collective; another process's death is one line naming this rank."""
        try:
            return collective()
        except (RuntimeError, ValueError) as error:  # DistBackendError, a closed store
            reason = _first_sentence(error)
            raise MicrotuneError(
                f"training process {self.rank} of {self.size} lost the others ({reason}); "
                "one of them stopped: see its output, fix the cause and rerun the same command "
                "with --resume"
            ) from None


@functools.cache  # once per process: a script may join and leave several groups
def die_with_launcher() -> None:
    """End this worker when the launcher that started it dies (torchrun killed with -9, its
    process group killed): torchrun starts each worker in a session of its own, so nothing else
    would stop it, and an orphan would keep the output folder's lock and finish the run where
    nobody sees it. Linux: the kernel sends SIGTERM at the parent's death (PR_SET_PDEATHSIG);
    elsewhere a daemon thread notices the parent change. A process no launcher started (a plain
    run, ranks started by hand) is left alone."""
    if LAUNCHER_VARIABLE not in os.environ:
        return
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != launcher:  # it died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)
            return
    watch = threading.Thread(target=_end_with, args=(launcher,), daemon=True)
    watch.start()


def _end_with(launcher: int) -> None:
    """Poll (a daemon thread) until the parent is no longer `launcher`, then end the process."""
    while os.getppid() == launcher:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _first_sentence(error: Exception) -> str:
    """The gist of a backend error: its last line without gloo's source-file prefix, up to
    the first full stop ("Connection closed by peer [127.0.0.1]:20915")."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")[:200]


SINGLE = World()
