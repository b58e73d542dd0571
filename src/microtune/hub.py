"""The Hugging Face hub: whether it may be reached, artifacts by hub id, and `microtune push`.

An artifact folder lives on the hub as a model repo holding the same files (microtune.json,
adapter.safetensors, metrics.json when there is one) plus a generated model card (README.md).
`resolve_artifact` turns a hub id into a folder in the hub cache (`snapshot_download`), so every
command that takes an artifact folder also takes `owner/name` or `owner/name@revision`; a local
folder always wins and never touches the hub. Every hub failure is one `MicrotuneError` line.

Nothing here imports huggingface_hub (or torch) until a hub call is made.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from microtune.errors import MicrotuneError

_TRUE = {"1", "true", "yes", "on"}
README_FILE = "README.md"
# owner/name as the hub spells repo ids (letters, digits, '-', '_', '.'), then an optional
# @revision (a branch, tag or commit; branches may hold '/', as in refs/pr/1).
_HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[^\s@]+))?"
)
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
PUSH_LOGIN_HINT = "log in with `hf auth login` or pass --token"


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a true value (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `text` reads as `owner/name[@revision]`, else None."""
    match = _HUB_ID.fullmatch(text)
    if match is None or ".." in match["repo"] or "--" in match["repo"]:
        return None  # the hub refuses these in repo ids; more likely a mistyped path
    return match["repo"], match["revision"]


def resolve_artifact(path_or_id: str | os.PathLike) -> Path:
    """The local folder of an artifact: the folder itself, or a hub id fetched into the cache.

    Args:
        path_or_id: an artifact folder, or a hub model repo id `owner/name` with an optional
            `@revision`. An existing local folder is used as it is and never sent to the hub.
            Offline (HF_HUB_OFFLINE=1) a hub id is served from the cache if fetched before.

    Returns:
        The folder holding microtune.json and adapter.safetensors.

    Raises:
        MicrotuneError: one line naming the problem (not a folder, offline, no network, repo or
            revision not found, not authorised) and the fix.
    """
    path = Path(path_or_id)
    if path.is_dir():
        return path
    name = str(path_or_id)
    hub_id = None if path.exists() or isinstance(path_or_id, Path) else parse_hub_id(name)
    if hub_id is None:
        raise MicrotuneError(
            f"artifact '{name}' is not a folder; pass the folder `microtune train --output` "
            "wrote, or a hub repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    from microtune.api import METRICS_FILE
    from microtune.artifact import CONFIG_FILE, TENSORS_FILE

    repo_id, revision = hub_id
    with hub_errors(name, repo_id, revision, LOGIN_HINT):
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                # Only the artifact's files: a model repo named by mistake costs a README.
                allow_patterns=[CONFIG_FILE, TENSORS_FILE, METRICS_FILE, README_FILE],
                local_files_only=is_offline(),  # the cache still serves fetched artifacts
            )
        )
    if not (folder / CONFIG_FILE).is_file():
        raise MicrotuneError(
            f"hub repo '{name}' holds no {CONFIG_FILE}, so it is not a microtune artifact; "
            "check the repo id (model repos load with --model, not --artifact)"
        )
    return folder


def push_artifact(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload a complete artifact folder to a hub model repo, with a generated model card.

    The folder is checked first (its config, and the tensor file against the hash the config
    names), so nothing reaches the hub from an incomplete or stale artifact. The repo is created
    if missing; one commit adds microtune.json, adapter.safetensors, metrics.json (if present)
    and README.md, and removes a metrics.json left by an earlier push that this one lacks.

    Args:
        directory: the folder `microtune train --output` wrote.
        repo_id: `owner/name` of the model repo.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main if missing); default main.
        token: a hub token; default the HF_TOKEN environment variable or the cached login.

    Returns:
        {"repo", "url", "revision", "commit", "commit_url", "files"} (the files uploaded).
    """
    from microtune.api import METRICS_FILE
    from microtune.artifact import (
        CONFIG_FILE,
        TENSORS_FILE,
        read_artifact_config,
        read_artifact_tensors,
    )

    folder = Path(directory)
    if not folder.is_dir():
        raise MicrotuneError(
            f"--artifact {directory} is not a folder; pass the folder `microtune train "
            "--output` wrote"
        )
    config = read_artifact_config(folder)
    read_artifact_tensors(folder, config)  # present, the hash the config names, valid
    parsed = parse_hub_id(repo_id)
    if parsed is None or parsed[1] is not None:
        raise MicrotuneError(
            f"--repo '{repo_id}' is not a hub repo id; use owner/name (a branch goes in --revision)"
        )
    if is_offline():
        raise MicrotuneError(
            "cannot push: the hub is offline (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE "
            "and run again with a network"
        )
    metrics = None
    if (folder / METRICS_FILE).is_file():
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    files = [CONFIG_FILE, TENSORS_FILE] + ([METRICS_FILE] if metrics is not None else [])
    card = model_card(config, metrics, repo_id, (folder / TENSORS_FILE).stat().st_size)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    with hub_errors(repo_id, repo_id, revision, PUSH_LOGIN_HINT):
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        present = api.list_repo_files(repo_id, revision=revision)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
            for name in files
        ]
        operations.append(CommitOperationAdd(README_FILE, card.encode("utf-8")))
        if METRICS_FILE in present and METRICS_FILE not in files:
            operations.append(CommitOperationDelete(METRICS_FILE))  # a stale run's numbers
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=f"microtune: {config['method']} on {config['task']['name']}",
            revision=revision,
        )
    return {
        "repo": repo_id,
        "url": str(url),
        "revision": revision or "main",
        "commit": commit.oid,
        "commit_url": commit.commit_url,
        "files": [*files, README_FILE],
    }


def model_card(
    config: dict[str, Any], metrics: dict[str, Any] | None, repo_id: str, tensor_bytes: int
) -> str:
    """The README.md pushed beside an artifact: hub metadata, what it is, how to load it."""
    from huggingface_hub import ModelCardData

    from microtune.methods import method_class

    base = config["base_model"]
    base_is_hub_id = parse_hub_id(base["name"]) is not None and not Path(base["name"]).exists()
    task = config["task"]
    method = config["method"]
    data = ModelCardData(
        base_model=base["name"] if base_is_hub_id else None,
        library_name="microtune",
        pipeline_tag="text-classification",
        tags=["microtune", method, task["name"]],
    )
    if base_is_hub_id:
        base_text = f"[`{base['name']}`](https://huggingface.co/{base['name']})"
    else:
        base_text = f"a local model folder (`{base['name']}`): pass `model=` or `--model` with it"
    labels = ", ".join(task.get("label_names") or []) or f"{task['num_labels']} outputs"
    parameters = config.get("parameters", {})
    rows = [
        ("base model", f"{base_text} ({base['model_type']}, fingerprint `{base['fingerprint']}`)"),
        ("method", f"`{method}` `{json.dumps(config['method_config'], sort_keys=True)}`"),
        ("task", f"`{task['name']}`: {labels}; text columns {', '.join(task['text_columns'])}"),
        (
            "size",
            f"{parameters.get('trained', '?')} trained numbers, "
            f"{parameters.get('stored', '?')} stored; adapter.safetensors {tensor_bytes} bytes",
        ),
    ]
    if metrics is not None:
        values = metrics.get("metrics") or {}
        shown = ", ".join(
            f"{key} {value:.4f}" for key, value in values.items() if isinstance(value, float)
        )
        rows.append(("dev metrics", f"{shown} after {metrics.get('steps', '?')} steps"))
        if metrics.get("epsilon") is not None:
            rows.append(("privacy", f"DP-SGD, ε = {metrics['epsilon']}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    example = '"an example text"' if len(task["text_columns"]) == 1 else '("first", "second")'
    merge_line = (
        'model.save_pretrained("merged")  # folded into the base weights: a transformers folder\n'
        if method_class(method).mergeable
        else ""
    )
    return f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[1]}

A microtune artifact: `{method}` fine-tuning of the base model below for `{task["name"]}`.
It holds only the trained tensors and their config; microtune applies them to the base model
after checking the base weights' fingerprint.

| | |
|---|---|
{table}

## Use

```python
import microtune

model = microtune.load("{repo_id}")  # fetches this repo and the base model
model.predict([{example}])  # [{{"label": ..., "score": ...}}]
{merge_line}```

From the shell: `microtune predict --artifact {repo_id} --input texts.txt`.

Written by microtune {config.get("library_version", "")}.
"""


@contextmanager
def hub_errors(name: str, repo_id: str, revision: str | None, login_hint: str) -> Iterator[None]:
    """Turn any hub failure inside the block into one MicrotuneError line with the fix."""
    try:
        yield
    except MicrotuneError:
        raise
    except Exception as error:  # only hub errors are translated; any other re-raises
        message = hub_error_message(error, name, repo_id, revision, login_hint)
        if message is None:
            raise
        raise MicrotuneError(message) from None


def hub_error_message(
    error: BaseException, name: str, repo_id: str, revision: str | None, login_hint: str
) -> str | None:
    """One line for a huggingface_hub failure, or None if `error` is not one."""
    from huggingface_hub import errors

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.RevisionNotFoundError):
        return (
            f"revision '{revision or 'main'}' of hub repo '{repo_id}' was not found; check the "
            "branch, tag or commit after '@'"
        )
    if isinstance(error, errors.GatedRepoError):
        return (
            f"hub repo '{repo_id}' is gated: ask for access on https://huggingface.co/{repo_id}, "
            f"then {login_hint}"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return (
            f"'{name}' is not a local folder, and no hub repo '{repo_id}' is visible to you; "
            f"check the path or repo id (a private repo: {login_hint})"
        )
    if isinstance(error, errors.LocalTokenNotFoundError) or status in (401, 403):
        shown = f" ({status})" if status else ""
        return f"the hub refused access to '{repo_id}'{shown}; {login_hint}"
    if isinstance(error, errors.OfflineModeIsEnabled) or (
        isinstance(error, errors.LocalEntryNotFoundError) and is_offline()
    ):
        return (
            f"'{name}' is not a local folder and the hub is offline (HF_HUB_OFFLINE is set, "
            "and it is not in the cache); unset HF_HUB_OFFLINE to fetch it, or pass the artifact "
            "folder `microtune train --output` wrote"
        )
    if _is_network_error(error) or isinstance(error, errors.LocalEntryNotFoundError):
        return (
            f"could not reach the hub for '{repo_id}' (no network?), and it is not in the cache; "
            "check the connection and run again"
        )
    if isinstance(error, errors.HfHubHTTPError):
        return f"the hub answered {status} for '{repo_id}': {_first_line(error)}; try again later"
    if isinstance(error, errors.HFValidationError):
        return f"'{repo_id}' is not a valid hub repo id ({_first_line(error)}); use owner/name"
    return None


def _is_network_error(error: BaseException) -> bool:
    """A connection or timeout failure, in this error or what caused it. By class name, since
    the hub client's HTTP library changed over its versions (requests, httpx, httpx2)."""
    names = {"ConnectionError", "TimeoutError", "Timeout", "TransportError"}
    seen: BaseException | None = error
    while seen is not None:
        if any(cls.__name__ in names for cls in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


__all__ = [
    "hub_error_message",
    "is_offline",
    "model_card",
    "parse_hub_id",
    "push_artifact",
    "resolve_artifact",
]
