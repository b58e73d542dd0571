"""Output folders: what microtune may write where, and one run per folder at a time.

Every command that writes a folder goes through here, so the rules live in one place:

- `check_output`: an empty name, a path under a file, or a folder that cannot be written is
  refused before anything is loaded;
- `training_folder` (train): locks the folder, removes the temporary files of a write a kill
  interrupted, and refuses files microtune did not write, another run's finished artifact and an
  unfinished run's checkpoint unless --resume / --overwrite says what to do with them;
- `model_folder` (merge, export, peft export, `TunedModel.save_pretrained`): always refuses the
  base model's folder and the artifact's (and any folder holding them), refuses a folder that
  is not empty unless --overwrite and it holds nothing but the files an export's record lists
  (never the user's own files), and hands out a staging folder beside the output that is
  moved into place only once complete, so a failure (disk full) leaves nothing half-written.

The lock is `filelock`'s: an OS lock (flock) that the kernel releases when its process dies, so
a run killed with -9 never blocks the next one, and nothing has to guess whether a PID recorded
in a file is still alive (PIDs are reused). The lock file holds the holder's PID only for the
message, and is removed on every exit path (exceptions, Ctrl-C).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from microtune.backbone.load import resolve_model_path
from microtune.common.files import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    EXPORT_FILE,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    TENSORS_FILE,
)
from microtune.common.manifest import listed_files, unlisted_entries
from microtune.errors import MicrotuneError

# The files that make a folder a model folder for transformers, peft or microtune.
MODEL_FILES = ("config.json", "pytorch_model.bin", "adapter_config.json")
MODEL_SUFFIXES = (".safetensors",)
# Permissions of what an export publishes (mkdtemp makes 0700, some writers 0600).
FILE_MODE, FOLDER_MODE = 0o644, 0o755


def check_output(folder: str | os.PathLike, flag: str = "--output") -> Path:
    """The absolute output path, or a one-line refusal: empty, under a file, not writable."""
    if not str(folder).strip():
        raise MicrotuneError(f"{flag} is empty; name a folder, e.g. {flag} runs/sst2")
    path = Path(os.path.abspath(folder))
    if path.exists() and not path.is_dir():
        raise MicrotuneError(f"{flag} {folder} is a file; name a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MicrotuneError(
            f"{flag} {folder}: {existing} is a file, so no folder can be made under it; "
            "choose another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MicrotuneError(
            f"{flag} {folder}: {existing} is not writable; choose a folder you can write"
        )
    return path


# -- the lock -----------------------------------------------------------------------------------


@contextmanager
def folder_lock(lock_path: Path, folder: Path) -> Iterator[None]:
    """Hold `lock_path` for the block, or refuse at once naming `folder` and the holder."""
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise MicrotuneError(
            f"{folder} is in use by another microtune run ({_holder(lock_path)}); wait for it "
            "to finish or choose another --output"
        ) from None
    ours = None
    try:
        lock_path.write_text(f"{os.getpid()}\n")
        ours = os.stat(lock_path)
        yield
    finally:
        # Removed while still held, and only if it is still our file (an export may have moved
        # the folder that held it).
        with suppress(OSError):
            now = os.stat(lock_path)
            if ours and (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                lock_path.unlink()
        lock.release()


def _holder(lock_path: Path) -> str:
    with suppress(OSError, ValueError):
        return f"PID {int(lock_path.read_text().strip())}"
    return "PID unknown"


def _refuse_protected(folder: Path, protected: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Refuse `folder` if it is, or contains, one of the (what, path) folders."""
    target = folder.resolve()
    for what, path in protected:
        if not path or not os.path.isdir(path):
            continue
        kept = Path(path).resolve()
        if target == kept or target in kept.parents:
            where = "is" if target == kept else "contains"
            raise MicrotuneError(
                f"--output {folder} {where} {what} ({kept}); writing there would replace it, "
                "choose another --output"
            )


# -- training folders ---------------------------------------------------------------------------


def training_files() -> tuple[str, ...]:
    """What a training run writes besides its lock: artifact, metrics, checkpoint, log."""

    return (TENSORS_FILE, CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, LOG_FILE)


def _is_torn_write(name: str) -> bool:
    """A temporary file artifact.atomic_write leaves when a kill interrupts it."""
    match = re.fullmatch(r"\.(.+)\.\w+\.tmp", name)
    return bool(match) and match.group(1) in training_files()


def _artifact_config(folder: Path) -> dict | None:
    """microtune.json's content if it is a microtune artifact config, else None."""
    with suppress(OSError, ValueError):
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.get("format") == "microtune-artifact":
            return config
    return None


def _foreign_files(folder: Path) -> list[str]:
    """Names in a training folder that microtune did not write."""

    ours = set(training_files()) | {LOCK_FILE}
    if _artifact_config(folder) is None:  # metrics.json is written after the artifact
        ours -= {CONFIG_FILE, METRICS_FILE}
    return sorted(
        name for name in os.listdir(folder) if name not in ours and not _is_torn_write(name)
    )


def check_training_folder(
    folder: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    protected: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Path:
    """Refuse a training --output microtune must not write (see the module docstring);
    writes nothing. Returns the absolute path."""
    if resume and overwrite:
        raise MicrotuneError(
            "--resume continues a run and --overwrite starts over; give only one of them"
        )
    folder = check_output(folder)
    _refuse_protected(folder, protected)
    if not folder.is_dir():
        return folder
    foreign = _foreign_files(folder)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise MicrotuneError(
            f"--output {folder} holds files microtune did not write ({shown}); choose a new or "
            "empty folder, or --overwrite to write beside them"
        )
    has_checkpoint = (folder / CHECKPOINT_FILE).is_file()
    if has_checkpoint and not (resume or overwrite):
        raise MicrotuneError(
            f"--output {folder} holds the checkpoint of an unfinished run; --resume to "
            "continue, --overwrite to start over"
        )
    config = _artifact_config(folder)
    if config is not None and not overwrite and not (resume and has_checkpoint):
        what = f"{config.get('method', '?')} on {config.get('task', {}).get('name', '?')}"
        raise MicrotuneError(
            f"--output {folder} holds a finished artifact ({what}); --overwrite to replace it, "
            "or choose another --output"
        )
    return folder


@contextmanager
def training_folder(
    folder: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    protected: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Iterator[Path]:
    """Hold the training --output for the block: checked, created, locked, cleaned.

    Torn temporary files are removed; with `overwrite`, the files of the previous run (artifact,
    metrics, checkpoint, log) too, so the folder never mixes two runs. Files microtune did not
    write are never touched. A folder this call created is removed again if the block fails
    before writing anything into it.

    Args:
        folder: the --output folder.
        resume: the run continues from the folder's checkpoint (if there is one).
        overwrite: the user allows replacing another run's files and writing beside theirs.
        protected: (what, path) folders that must not be written, e.g. the base model's.
    """
    protected = list(protected)
    folder = check_training_folder(folder, resume=resume, overwrite=overwrite, protected=protected)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(folder / LOCK_FILE, folder):
            # Again under the lock: another run may have written here since.
            check_training_folder(folder, resume=resume, overwrite=overwrite, protected=protected)
            for name in os.listdir(folder):
                if _is_torn_write(name) or (overwrite and name in training_files()):
                    (folder / name).unlink()
            yield folder
    except BaseException:
        if created:
            with suppress(OSError):
                folder.rmdir()  # only if still empty: a checkpoint is kept for --resume
        raise


# -- model folders (merge and export) -----------------------------------------------------------


def _model_files(folder: Path) -> list[str]:
    return sorted(
        name for name in os.listdir(folder) if name in MODEL_FILES or name.endswith(MODEL_SUFFIXES)
    )


def check_model_folder(
    folder: str | os.PathLike,
    *,
    overwrite: bool,
    protected: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Path:
    """Refuse a merge/export --output microtune must not write; writes nothing. Returns the
    absolute path."""
    folder = check_output(folder)
    _refuse_protected(folder, protected)
    if folder.parent.exists() and not os.access(folder.parent, os.W_OK | os.X_OK):
        raise MicrotuneError(
            f"--output {folder}: {folder.parent} is not writable, and the export is built "
            "beside its folder; choose a folder you can write"
        )
    if not folder.is_dir():
        return folder
    others = sorted(set(os.listdir(folder)) - {LOCK_FILE})
    if overwrite:
        if others:
            _check_replaceable(folder, others)
        return folder
    models = _model_files(folder)
    if models:
        raise MicrotuneError(
            f"--output {folder} holds a model ({', '.join(models[:3])}); --overwrite to "
            "replace the folder, or choose another --output"
        )
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise MicrotuneError(
            f"--output {folder} is not empty ({shown}); choose a new or empty folder (--overwrite "
            "replaces only a folder microtune exported)"
        )
    return folder


def _check_replaceable(folder: Path, entries: list[str]) -> None:
    """--overwrite replaces a folder as a whole, so only one holding nothing but what an export
    wrote there (the files its record lists, `common.manifest`): never the user's own files
    (issue 23), beside an export or not (issue 32)."""
    if not (folder / EXPORT_FILE).is_file():
        foreign = entries
    else:
        record = _export_record(folder)
        try:
            files = listed_files(record, folder / EXPORT_FILE) if record is not None else None
        except MicrotuneError:  # an edited list may name the user's files as microtune's
            files = None
        if files is None:
            raise MicrotuneError(
                f"--output {folder} holds an export whose {EXPORT_FILE} lists no files (written "
                "before microtune listed them, or edited since), so --overwrite cannot tell its "
                "files from yours: delete that folder yourself, or choose a new or empty folder"
            )
        foreign = unlisted_entries(folder, files)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise MicrotuneError(
            f"--output {folder} holds files microtune did not write ({shown}); --overwrite only "
            "replaces a folder holding nothing but an export's own files: move yours out, or "
            "choose a new or empty folder"
        )


def _export_record(folder: Path) -> dict | None:
    """The folder's export record as JSON, else None (unreadable: from no export we know)."""
    with suppress(OSError, ValueError):
        record = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
        if isinstance(record, dict):
            return record
    return None


def base_model_folders(
    names: Iterable[str | os.PathLike | None],
) -> list[tuple[str, str]]:
    """The local folders of base models (packaged models included), as (what, path) pairs
    for `protected`: a name that is no local folder (a hub id) is skipped."""

    folders = []
    for name in names:
        if not name:
            continue
        with suppress(MicrotuneError):
            path = resolve_model_path(str(name))
            if os.path.isdir(path):
                folders.append(("the base model's folder", path))
    return folders


def export_protected(
    config: dict, artifact_dir: str | os.PathLike | None = None, model: str | None = None
) -> list[tuple[str, str]]:
    """The folders an export must never replace: the artifact's, and its base model's as the
    artifact names it and as `model` (--model) overrides it."""
    protected = base_model_folders([config.get("base_model", {}).get("name"), model])
    if artifact_dir is not None:
        protected.append(("the artifact's folder", str(artifact_dir)))
    return protected


def _staging_name(folder: Path, kind: str) -> str:
    return f".{folder.name}.{kind}-"


def _clean_killed_exports(folder: Path) -> None:
    """Delete what an export killed before it finished left beside `folder`; a folder it was
    replacing, killed between the two renames of `_publish`, is put back first."""
    for name in os.listdir(folder.parent):
        if name.startswith(_staging_name(folder, "old")):
            saved = folder.parent / name / "folder"
            if saved.is_dir() and not folder.exists():
                os.rename(saved, folder)
        if name.startswith((_staging_name(folder, "old"), _staging_name(folder, "partial"))):
            shutil.rmtree(folder.parent / name, ignore_errors=True)


def _publish(staging: Path, folder: Path) -> None:
    """Give the finished staging folder the usual permissions and move it to `folder`."""
    for root, dirs, files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(root, name), FOLDER_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)
    os.chmod(staging, FOLDER_MODE)
    if not folder.exists():
        try:
            os.rename(staging, folder)
        except OSError:  # created meanwhile by something that does not take our lock
            raise MicrotuneError(
                f"--output {folder} appeared while the export was written; run again"
            ) from None
        return
    # Replacing a folder: move the old one aside, the new one in, then delete the old one.
    old = Path(tempfile.mkdtemp(prefix=_staging_name(folder, "old"), dir=folder.parent))
    os.rename(folder, old / "folder")
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(old / "folder", folder)  # put the old one back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def model_folder(
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Iterator[Path]:
    """Yield a staging folder to write an export into; it becomes `folder` when the block
    succeeds, and is deleted (leaving `folder` as it was) when it fails.

    Args:
        folder: the --output folder.
        overwrite: the user allows replacing a folder that is not empty (as a whole).
        protected: (what, path) folders that must never be replaced: the base model's, the
            artifact's.
    """
    protected = list(protected)
    folder = check_model_folder(folder, overwrite=overwrite, protected=protected)
    created = [path for path in (folder.parent, *folder.parent.parents) if not path.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ExitStack() as held:
            # The lock sits beside the folder (the folder itself is replaced); an existing
            # folder's own lock is taken too, so a training run in it is not replaced under
            # its feet.
            held.enter_context(folder_lock(folder.parent / f".{folder.name}{LOCK_FILE}", folder))
            _clean_killed_exports(folder)
            if folder.is_dir():
                held.enter_context(folder_lock(folder / LOCK_FILE, folder))
            check_model_folder(folder, overwrite=overwrite, protected=protected)
            staging = Path(
                tempfile.mkdtemp(prefix=_staging_name(folder, "partial"), dir=folder.parent)
            )
            try:
                yield staging
                _publish(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # nothing left once published
    except BaseException:
        for path in created:  # a failed export leaves no folder it made behind, deepest first
            with suppress(OSError):
                path.rmdir()
        raise


__all__ = [
    "LOCK_FILE",
    "base_model_folders",
    "check_model_folder",
    "check_output",
    "check_training_folder",
    "export_protected",
    "folder_lock",
    "model_folder",
    "training_folder",
]
