"""What an export folder holds, by content: the SHA-256 of every file an export wrote, recorded
in its `microtune_export.json` ("files"), and a hash of that record itself ("record_sha256").

Loading an export checks both first (`check_export_files`): a file replaced (another task's
`model.onnx`), truncated or edited, a record edited by hand (its label names), or a file a
loader would read that the export never wrote (an `adapter_config.json` dropped beside a stock
model) is refused in one line instead of predicting with the wrong labels. `--overwrite` reads
the same list (`unlisted_entries`) to tell microtune's files from the user's, so that it never
deletes a file microtune did not write. Exports from before these hashes have no list: they
load unchecked, and are never replaced by --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from microtune.common.files import EXPORT_FILE, LOCK_FILE, file_sha256
from microtune.errors import MicrotuneError

FILES_KEY = "files"
RECORD_HASH_KEY = "record_sha256"
# Never in the list: the record (it holds the list) and the lock a writer holds in the folder.
UNLISTED = (EXPORT_FILE, LOCK_FILE)
# Files a loader (transformers, peft, sentence-transformers, onnxruntime, a tokenizer) may read
# by their name alone: one the export did not write would change what the folder computes.
LOADER_SUFFIXES = (".json", ".safetensors", ".bin", ".onnx", ".model", ".pt", ".pth")
AGAIN = "export the artifact again (microtune export / merge)"


def record_sha256(record: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON without this hash (as `config_sha256` covers an
    artifact's microtune.json)."""
    body = {key: value for key, value in record.items() if key != RECORD_HASH_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def folder_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder` (links not followed), as a relative POSIX path, but the
    record and the lock."""
    folder = Path(folder)
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            relative = (Path(parent) / name).relative_to(folder).as_posix()
            if relative not in UNLISTED:
                found.append(relative)
    return sorted(found)


def seal_record(record: dict[str, Any], folder: str | os.PathLike) -> dict[str, Any]:
    """The record with the hash of every file now in `folder` and its own hash: written last,
    once the folder holds everything the export writes."""
    files = {name: file_sha256(Path(folder) / name) for name in folder_files(folder)}
    sealed = {**record, FILES_KEY: files}
    return {**sealed, RECORD_HASH_KEY: record_sha256(sealed)}


def listed_files(record: dict[str, Any], where: str | os.PathLike) -> dict[str, str] | None:
    """The record's {file: sha256}, once the record matches its own hash; None for an export
    from before the hashes (neither key). Refuses a record edited since the export."""
    if FILES_KEY not in record and RECORD_HASH_KEY not in record:
        return None
    if record.get(RECORD_HASH_KEY) != record_sha256(record):
        raise MicrotuneError(
            f"{where} was changed after the export (its content does not match its "
            f"{RECORD_HASH_KEY}); {AGAIN}"
        )
    files = record.get(FILES_KEY)
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise MicrotuneError(f"{where} lists its files wrongly; {AGAIN}")
    return files


def unlisted_entries(folder: str | os.PathLike, files: dict[str, str]) -> list[str]:
    """What `folder` holds that is not an export's file: files not in `files`, and folders
    holding none of them (links not followed)."""
    folder = Path(folder)
    listed = set(files)
    above = {str(parent) for name in listed for parent in PurePosixPath(name).parents}
    found = []
    for parent, dirs, names in os.walk(folder):
        here = Path(parent).relative_to(folder)
        for name in list(dirs):
            relative = (here / name).as_posix()
            if relative not in above:
                found.append(relative + "/")
                dirs.remove(name)  # the whole folder is the user's
        for name in names:
            relative = (here / name).as_posix()
            if relative not in listed and relative not in UNLISTED:
                found.append(relative)
    return sorted(found)


def check_export_files(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Refuse, in one line, an export folder that is not what the export wrote: an edited
    record, a listed file missing or changed, or an unlisted file a loader would read."""
    folder = Path(folder)
    files = listed_files(record, folder / EXPORT_FILE)
    if files is None:
        return  # an export from before the hashes: nothing recorded to check against
    for name, digest in sorted(files.items()):
        path = folder / name
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise MicrotuneError(f"{folder / EXPORT_FILE} lists {name}, outside it; {AGAIN}")
        if not path.is_file():
            raise MicrotuneError(f"{path} is missing from the export; {AGAIN}")
        if file_sha256(path) != digest:
            raise MicrotuneError(
                f"{path} is not the file the export wrote (its sha256 differs from the one in "
                f"{EXPORT_FILE}): replaced or edited since; {AGAIN}"
            )
    foreign = [n for n in unlisted_entries(folder, files) if n.endswith(LOADER_SUFFIXES)]
    if foreign:
        raise MicrotuneError(
            f"{folder} holds {', '.join(foreign[:3])}, which the export did not write and a "
            f"loader would read; remove it, or {AGAIN}"
        )


__all__ = [
    "FILES_KEY",
    "RECORD_HASH_KEY",
    "check_export_files",
    "folder_files",
    "listed_files",
    "record_sha256",
    "seal_record",
    "unlisted_entries",
]
