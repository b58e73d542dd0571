"""The files microtune writes, by name, and how it writes them: atomically, so that a reader
(or a crash) sees the old file or the new one, never half of one.

A run folder holds the artifact (`adapter.safetensors` + `microtune.json`), `metrics.json`,
`train_log.jsonl` and, while training, `checkpoint.safetensors`; an export folder holds a model
folder plus `microtune_export.json` (and `head.safetensors` beside a bare backbone).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microtune.errors import MicrotuneError

if TYPE_CHECKING:
    import torch

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "microtune.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
EXPORT_FILE = "microtune_export.json"
HEAD_FILE = "head.safetensors"
README_FILE = "README.md"  # the model card of an artifact on the hub
LOCK_FILE = ".microtune.lock"  # held by the run or export writing the folder


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename into place: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Strict, sorted, indented JSON, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            # Strict JSON: a NaN or infinity here is a bug upstream, never a value to write.
            json.dump(data, handle, indent=2, sort_keys=True, allow_nan=False)
            handle.write("\n")

    atomic_write(path, write)


def write_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """A safetensors file of CPU copies of the tensors, written atomically."""
    from safetensors.torch import save_file  # torch only when tensors are written

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def file_sha256(path: str | os.PathLike) -> str:
    """The "sha256:<hex>" digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # streamed: a large file is never held whole
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def check_inside(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """`folder`, resolved, once every entry under it (walked without following links)
    resolves inside `root`: a file linked out of it is never read. `root` defaults to the
    folder itself, or for a hub cache snapshot (`…/snapshots/REV`) to its repo folder, whose
    `blobs/` its links point to."""
    folder = Path(folder).resolve()
    if root is None:
        hub_cache = folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir()
        root = folder.parent.parent if hub_cache else folder
    root = Path(root).resolve()
    for parent, names, files in os.walk(folder):
        for name in names + files:
            entry = Path(parent) / name
            if not entry.resolve().is_relative_to(root):
                raise MicrotuneError(
                    f"{entry} links outside {root} (to {entry.resolve()}); copy the file into "
                    "the folder instead of linking it"
                )
    return folder
