"""Fetching from the Hugging Face hub: whether it may be reached, and artifacts by hub id.

An artifact folder lives on the hub as a model repo holding the same files (microtune.json,
adapter.safetensors, metrics.json when there is one) plus a model card (`microtune.artifacts.push`).
`resolve_artifact` turns a hub id into a folder in the hub cache (`snapshot_download`), so every
command that takes an artifact folder also takes `owner/name` or `owner/name@revision`; a local
folder always wins and never touches the hub. Every hub failure is one `MicrotuneError` line.

Nothing here imports huggingface_hub (or torch) until a hub call is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from microtune.common.files import (
    CONFIG_FILE,
    METRICS_FILE,
    README_FILE,
    TENSORS_FILE,
    check_inside,
)
from microtune.errors import MicrotuneError

_TRUE = {"1", "true", "yes", "on"}
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
        check_inside(path)  # no file of the folder is a link out of it
        return path
    name = str(path_or_id)
    hub_id = None if path.exists() or isinstance(path_or_id, Path) else parse_hub_id(name)
    if hub_id is None:
        raise MicrotuneError(
            f"artifact '{name}' is not a folder; pass the folder `microtune train --output` "
            "wrote, or a hub repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download

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
    "parse_hub_id",
    "resolve_artifact",
]
