"""Per-task artifacts: safetensors + JSON, tied to the base model by a fingerprint.

An artifact folder holds `adapter.safetensors` (what the method stores, `TaskModel.stored_state`:
by default the trained tensors, z and the head for SLaSh) and `microtune.json` (method and head
config, the method's stored metadata, trained and stored parameter counts, task, base model name
and fingerprints of its weights and tokenizer, library version, and the SHA-256 of the tensor
file). Nothing is ever unpickled, and nothing is trusted before it is checked: the config
against `artifacts.schema`, the tensor file against its hash, then every tensor's name, shape,
dtype and finiteness against what the rebuilt model stores. `read_export_record` reads the
record (`microtune_export.json`) that every export writes beside its files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from microtune.artifacts.schema import FIX, FORMAT_VERSION, check_sizes, problem, validate_config
from microtune.backbone.load import (
    backbone_dtype,
    check_max_length,
    dtype_name,
    fingerprint,
    load_backbone,
    tokenizer_fingerprint,
)
from microtune.common.files import (
    CONFIG_FILE,
    EXPORT_FILE,
    TENSORS_FILE,
    check_inside,
    file_sha256,
    write_json,
    write_tensors,
)
from microtune.common.hub import resolve_artifact
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.types import task_type_of
from microtune.version import __version__


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
    tokenizer: Any = None,
) -> int:
    """Write the artifact; returns its size in bytes (both files).

    `extra`: further JSON records for microtune.json (e.g. "privacy" for a DP-trained run).
    `tokenizer`: the base model's; its fingerprint is recorded and checked at load."""
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
            # The precision the base was trained in (--dtype); older artifacts mean float32.
            "dtype": dtype_name(backbone_dtype(model.backbone)),
            "fingerprint": base_fingerprint,
            **(
                {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
                if tokenizer is not None
                else {}
            ),
        },
        **(extra or {}),
        # Written last: a config that names its tensor file's hash cannot pair with a stale one.
        "tensors_sha256": file_sha256(tensors_path),
    }
    config["config_sha256"] = config_sha256(config)
    write_json(directory / CONFIG_FILE, config)
    return artifact_bytes(directory)


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (without this hash): a hand-edited value (a seed,
    the label names) changes what the tensors mean, so an edit must not load silently."""
    body = {key: value for key, value in config.items() if key != "config_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def artifact_bytes(directory: str | os.PathLike) -> int:
    directory = Path(directory)
    return sum((directory / name).stat().st_size for name in (TENSORS_FILE, CONFIG_FILE))


def read_artifact_config(directory: str | os.PathLike) -> dict[str, Any]:
    """`microtune.json`, checked against `artifacts.schema` (one-line errors); `directory` may
    be a hub id (`owner/name[@revision]`), fetched into the hub cache (`hub.resolve_artifact`)."""
    directory = resolve_artifact(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise MicrotuneError(f"{directory} is not a microtune artifact (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise problem(path, "(file)", f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise problem(path, "(top level)", "not a JSON object, so not a microtune artifact config")
    if config.get("format") != "microtune-artifact":
        raise problem(path, "format", "not 'microtune-artifact': not a microtune artifact config")
    config = validate_config(config, path)
    if config.get("config_sha256") not in (None, config_sha256(config)):
        raise MicrotuneError(
            f"{path} was changed after training (its content does not match its "
            f"config_sha256); {FIX}"
        )
    return config


def read_artifact_tensors(directory: str | os.PathLike, config: dict[str, Any]) -> dict:
    """The tensor file, once it matches the config's hash and is valid safetensors."""
    path = Path(directory) / TENSORS_FILE
    if not path.is_file() or file_sha256(path) != config["tensors_sha256"]:
        raise MicrotuneError(f"{path} is missing or does not match {CONFIG_FILE}; {FIX}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise problem(path, "(file)", f"not a valid safetensors file ({error})") from None


def check_tensors(
    stored: dict[str, torch.Tensor], model: TaskModel, path: str | os.PathLike
) -> None:
    """Names, shapes and dtypes must be exactly what the rebuilt model stores (asked of the
    model: PaFi and HiWi store other tensors than they train); no cast, no NaN or infinity."""
    expected = model.stored_state()
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        name = (missing or extra)[0]
        what = "missing" if missing else "not part of this method's stored state"
        raise problem(path, name, f"{what} ({len(missing)} missing, {len(extra)} unexpected)")
    for name, want in expected.items():
        got = stored[name]
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            raise problem(
                path,
                name,
                f"stored {got.dtype} {tuple(got.shape)} but the model built from {CONFIG_FILE} "
                f"expects {want.dtype} {tuple(want.shape)}",
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise problem(path, name, "holds NaN or infinite values")


@dataclass
class LoadedBase:
    """A base model already in memory (as `load_backbone` returns it) with its fingerprints, so
    that many artifacts load onto one copy without reloading or rehashing it
    (`microtune.serving.multitask`); the checks against each artifact's record are the same."""

    model: Any
    tokenizer: Any
    fingerprint: str
    tokenizer_fingerprint: str
    name: str | None = None  # what was loaded (a refusal names it), when known
    # The Auto class it was loaded with: the part of the base its tasks read (a causal LM's
    # whole model, its LM head included; a classifier's body alone).
    auto_class: str = "AutoModel"


def load_base(
    artifact: str | os.PathLike | Mapping[str, Any],
    model_name: str | None = None,
    device: torch.device | None = None,
) -> LoadedBase:
    """The base model an artifact (its folder, or its config as read) names, or `model_name`,
    with its fingerprints; in the precision it was trained in, so that the fingerprint (which
    covers dtypes) matches. `device`: moved there and put in eval mode."""
    config = artifact if isinstance(artifact, Mapping) else read_artifact_config(artifact)
    base = config["base_model"]
    auto_class = task_type_of(config["task"]).auto_class
    backbone, tokenizer = load_backbone(
        model_name or base["name"], base.get("dtype", "float32"), auto_class
    )
    if device is not None:
        backbone.to(device).eval()
    return LoadedBase(
        backbone,
        tokenizer,
        fingerprint(backbone),
        tokenizer_fingerprint(tokenizer),
        name=str(model_name or base["name"]),
        auto_class=auto_class,
    )


def check_same_reading(config: dict[str, Any], base: LoadedBase, directory) -> None:
    """A base loaded for other task types reads another part of the model (a causal LM's LM
    head, or a classifier's body alone), so its fingerprint differs from the artifact's even on
    the same weights: say so, instead of a base-model mismatch that --model cannot fix."""
    task_type = task_type_of(config["task"])
    if task_type.auto_class != base.auto_class:
        raise MicrotuneError(
            f"{directory} is a {task_type.name} task, which reads the base model through "
            f"{task_type.auto_class}, but the tasks already loaded read '{base.name}' through "
            f"{base.auto_class}: one loaded base cannot serve both (no --model changes that); "
            "serve this artifact from a server or load_many of its own"
        )


def check_base(
    base: dict[str, Any], model_name: str | None, found: str, found_tokenizer: str
) -> None:
    """The base model's weights (and, where recorded, its tokenizer) are the artifact's.
    `model_name`: the base model actually loaded (None: the one the artifact names)."""
    if found != base["fingerprint"]:
        raise MicrotuneError(
            f"base model mismatch: the artifact was trained on '{base['name']}' "
            f"({base['fingerprint'][:19]}…) but '{model_name or base['name']}' has "
            f"{found[:19]}…; pass --model with the original base model"
        )
    expected_tokenizer = base.get("tokenizer_fingerprint")
    if expected_tokenizer and found_tokenizer != expected_tokenizer:
        raise MicrotuneError(
            f"tokenizer mismatch: '{model_name or base['name']}' has the base weights the "
            "artifact was trained on but a different tokenizer (vocabulary, merges or special "
            "tokens); pass --model with the original base model folder"
        )


def load_artifact(
    directory: str | os.PathLike,
    model_name: str | None = None,
    method_options: dict[str, Any] | None = None,
    base_model: LoadedBase | None = None,
) -> tuple[TaskModel, Any, dict[str, Any]]:
    """Rebuild the trained task model: (model, tokenizer, artifact config).

    The base model is the one named in the artifact unless `model_name` overrides it; either
    way its weights (and, where recorded, its tokenizer) must match the stored fingerprints.
    `method_options` override stored method options that do not change the stored tensors,
    e.g. {"memory_lean": True}. Every check that needs no model runs before the model is built.
    `base_model`: a base already loaded, used (and changed by the method) in place of loading.
    """
    directory = resolve_artifact(directory)  # a hub id: fetched once, then a folder
    config = read_artifact_config(directory)
    config_path = directory / CONFIG_FILE
    stored = read_artifact_tensors(directory, config)
    check_sizes(config, sum(t.numel() for t in stored.values()), config_path)
    base = base_model if base_model is not None else load_base(config, model_name)
    check_same_reading(config, base, directory)
    loaded = base.name or model_name  # a base passed in was loaded from its own name
    check_base(config["base_model"], loaded, base.fingerprint, base.tokenizer_fingerprint)
    backbone, tokenizer = base.model, base.tokenizer
    try:
        check_max_length(backbone, config["max_length"])
    except MicrotuneError as error:
        detail = str(error).split(";")[0].removeprefix("--max-length ")
        raise problem(config_path, "max_length", detail) from None
    method = build_method(config["method"], {**config["method_config"], **(method_options or {})})
    model = TaskModel(
        backbone,
        HeadConfig(**config["head"]),
        method,
        mask_token_id=tokenizer.mask_token_id,
        task_type=task_type_of(config["task"]),
    )
    check_tensors(stored, model, directory / TENSORS_FILE)
    model.load_stored_state(stored, config.get("method_state", {}))
    model.eval()
    return model, tokenizer, config


def read_export_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's `microtune_export.json`, or a one-line refusal naming what to pass (also
    when a file of the folder is a link out of it: every file it loads is read from inside)."""
    if Path(folder).is_dir():
        check_inside(folder)
    path = Path(folder) / EXPORT_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MicrotuneError(
            f"{folder} is not a microtune export (no {EXPORT_FILE}); pass the folder that "
            "`microtune export` or `microtune merge` wrote"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MicrotuneError(f"{path} cannot be read ({error}); export again") from None
    if not isinstance(info, dict) or not isinstance(info.get("format"), str):
        raise MicrotuneError(f"{path} names no export format; export again")
    return info
