"""Per-task artifacts: safetensors + JSON, tied to the base model by a fingerprint.

An artifact folder holds `adapter.safetensors` (what the method stores, `TaskModel.stored_state`:
by default the trained tensors, z and the head for SLaSh) and `microtune.json` (method and head
config, the method's stored metadata, trained and stored parameter counts, task, base model name
and fingerprint, library version, and the SHA-256 of the tensor file). Nothing is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from microtune import __version__
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel, load_backbone

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "microtune.json"
FORMAT_VERSION = 1


def fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over every weight of the backbone (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


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
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_write(path, write)


def write_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def _file_sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def save_artifact(
    directory: str | os.PathLike,
    model: TaskModel,
    *,
    method_name: str,
    base_model: str,
    base_fingerprint: str,
    task: dict[str, Any],
    max_length: int,
    extra: dict[str, Any] | None = None,
) -> int:
    """Write the artifact; returns its size in bytes (both files).

    `extra`: further JSON records for microtune.json (e.g. "privacy" for a DP-trained run)."""
    directory = Path(directory)
    tensors_path = directory / TENSORS_FILE
    write_tensors(tensors_path, model.stored_state())
    config = {
        "format": "microtune-artifact",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": method_name,
        "method_config": model.method.config.to_dict() if model.method else {},
        # What the method needs besides its tensors to load them back (PaFi: the mask hash).
        "method_state": model.method.stored_metadata() if model.method else {},
        "parameters": {"trained": model.count_trainable(), "stored": model.count_stored()},
        "head": asdict(model.head_config),
        "task": task,
        "max_length": max_length,
        "base_model": {
            "name": base_model,
            "model_type": model.backbone.config.model_type,
            "fingerprint": base_fingerprint,
        },
        **(extra or {}),
        # Written last: a config that names its tensor file's hash cannot pair with a stale one.
        "tensors_sha256": _file_sha256(tensors_path),
    }
    write_json(directory / CONFIG_FILE, config)
    return artifact_bytes(directory)


def artifact_bytes(directory: str | os.PathLike) -> int:
    directory = Path(directory)
    return sum((directory / name).stat().st_size for name in (TENSORS_FILE, CONFIG_FILE))


def read_artifact_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MicrotuneError(f"{directory} is not a microtune artifact (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MicrotuneError(f"{path} is not valid JSON ({error}); re-run training") from None
    if config.get("format") != "microtune-artifact":
        raise MicrotuneError(f"{path} is not a microtune artifact config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise MicrotuneError(
            f"{path} has format version {config['format_version']}; upgrade microtune"
        )
    return config


def load_artifact(
    directory: str | os.PathLike,
    model_name: str | None = None,
    method_options: dict[str, Any] | None = None,
) -> tuple[TaskModel, Any, dict[str, Any]]:
    """Rebuild the trained task model: (model, tokenizer, artifact config).

    The base model is the one named in the artifact unless `model_name` overrides it; either
    way its weights must match the stored fingerprint. `method_options` override stored method
    options that do not change the stored tensors, e.g. {"memory_lean": True}.
    """
    directory = Path(directory)
    config = read_artifact_config(directory)
    base = config["base_model"]
    backbone, tokenizer = load_backbone(model_name or base["name"])
    found = fingerprint(backbone)
    if found != base["fingerprint"]:
        raise MicrotuneError(
            f"base model mismatch: the artifact was trained on '{base['name']}' "
            f"({base['fingerprint'][:19]}…) but '{model_name or base['name']}' has "
            f"{found[:19]}…; pass --model with the original base model"
        )
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file() or _file_sha256(tensors_path) != config["tensors_sha256"]:
        raise MicrotuneError(f"{tensors_path} is missing or does not match {CONFIG_FILE}")
    method = build_method(config["method"], {**config["method_config"], **(method_options or {})})
    model = TaskModel(
        backbone, HeadConfig(**config["head"]), method, mask_token_id=tokenizer.mask_token_id
    )
    model.load_stored_state(load_file(tensors_path), config.get("method_state", {}))
    model.eval()
    return model, tokenizer, config
