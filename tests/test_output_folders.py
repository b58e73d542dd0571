"""Output folders (issue 12): refusals that keep the user's files, the per-folder lock, torn
writes cleaned, and exports that appear whole or not at all."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from microtune import cli
from microtune.artifacts import folders
from microtune.common.files import CHECKPOINT_FILE, EXPORT_FILE, write_json
from microtune.common.manifest import seal_record
from microtune.errors import MicrotuneError


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def refused(argv: list[str], capsys, *expected: str) -> str:
    """Run the CLI, assert exit code 2 and a one-line error holding `expected`; return it."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("microtune: error:") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


def sealed_export(folder: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """An earlier export's folder: these files and a record listing their hashes, as an export
    writes it; returns the folder's snapshot."""
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    record = seal_record({"format": "sentence-transformers"}, folder)
    write_json(folder / EXPORT_FILE, record)
    return snapshot(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dirs) -> Path:
    """A private copy of the tiny BERT: the tests try to write over it."""
    return Path(shutil.copytree(tiny_model_dirs["bert"], tmp_path_factory.mktemp("base") / "bert"))


def train_argv(output, base, toy_files, *extra) -> list[str]:
    return [
        "train",
        "--task",
        "sst2",
        "--method",
        "slash",
        "--d",
        "8",
        "--model",
        str(base),
        "--train-file",
        str(toy_files / "train.jsonl"),
        "--dev-file",
        str(toy_files / "dev.jsonl"),
        "--max-steps",
        "2",
        "--eval-every",
        "0",
        "--no-progress",
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, base, toy_files) -> Path:
    folder = tmp_path_factory.mktemp("artifact") / "run"
    assert cli.main(train_argv(folder, base, toy_files)) == 0
    return folder


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of the user's own files, one of them named like microtune's metrics."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "metrics.json").write_text('{"mine": true}\n')
    return folder


@pytest.mark.parametrize("output", ["", "   "])
@pytest.mark.parametrize("command", ["train", "merge"])
def test_an_empty_output_is_refused(command, output, tmp_path, monkeypatch, capsys, artifact):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("the user's\n")
    before = snapshot(tmp_path)
    argv = (
        train_argv(output, "unused", tmp_path)
        if command == "train"
        else ["merge", "--artifact", str(artifact), "--output", output]
    )
    refused(argv, capsys, "--output is empty")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["train", "merge"])
def test_an_output_under_a_file_is_refused(command, tmp_path, capsys, artifact):
    user_file = tmp_path / "data.txt"
    user_file.write_text("the user's\n")
    for output, expected in (
        (user_file, "is a file; name a folder"),
        (user_file / "sub", "is a file, so no folder"),
    ):
        argv = (
            train_argv(output, "unused", tmp_path)
            if command == "train"
            else ["merge", "--artifact", str(artifact), "--output", str(output)]
        )
        refused(argv, capsys, expected)
    assert user_file.read_text() == "the user's\n"


def test_a_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0555 folder is still writable")
        refused(train_argv(folder / "run", "unused", tmp_path), capsys, "is not writable")
        with pytest.raises(MicrotuneError, match="is not writable"):
            folders.check_model_folder(folder / "merged", overwrite=True)
    finally:
        folder.chmod(0o755)


def test_files_microtune_did_not_write_are_refused_unless_overwrite(
    user_folder, base, toy_files, capsys
):
    before = snapshot(user_folder)
    refused(train_argv(user_folder, base, toy_files), capsys, "notes.txt", "--overwrite")
    assert snapshot(user_folder) == before
    # --overwrite writes beside them; the user's own file is never touched.
    assert cli.main(train_argv(user_folder, base, toy_files, "--overwrite")) == 0
    assert (user_folder / "notes.txt").read_text() == "my notes\n"
    assert (user_folder / "microtune.json").is_file()
    assert not (user_folder / folders.LOCK_FILE).exists()


def test_another_runs_artifact_is_replaced_only_with_overwrite(
    artifact, tmp_path, base, toy_files, capsys
):
    folder = Path(shutil.copytree(artifact, tmp_path / "run"))
    before = snapshot(folder)
    for extra in ((), ("--resume",)):  # no checkpoint: --resume has nothing to continue
        refused(
            train_argv(folder, base, toy_files, "--seed", "1", *extra),
            capsys,
            "holds a finished artifact (slash on sst2)",
            "--overwrite",
        )
        assert snapshot(folder) == before
    assert cli.main(train_argv(folder, base, toy_files, "--seed", "1", "--overwrite")) == 0
    assert json.loads((folder / "metrics.json").read_text())["seed"] == 1


def test_a_checkpoint_is_never_deleted_without_resume_or_overwrite(
    tmp_path, base, toy_files, capsys, monkeypatch
):
    import torch

    folder = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_at_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C mid-run
        return real_step(self, *args, **kwargs)

    argv = train_argv(folder, base, toy_files, "--max-steps", "4", "--checkpoint-every", "2")
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", crash_at_third)
        assert cli.main(argv) == 130
    assert (folder / CHECKPOINT_FILE).is_file()
    assert not (folder / folders.LOCK_FILE).exists()  # released on Ctrl-C
    before = snapshot(folder)
    refused(argv, capsys, "holds the checkpoint of an unfinished run", "--resume to continue")
    refused([*argv, "--resume", "--overwrite"], capsys, "give only one of them")
    assert snapshot(folder) == before
    assert cli.main([*argv, "--resume"]) == 0
    assert not (folder / CHECKPOINT_FILE).exists()  # the finished run removes its own


def test_torn_writes_are_cleaned_at_the_next_start(tmp_path, base, toy_files):
    folder = tmp_path / "run"
    folder.mkdir()
    torn = [".checkpoint.safetensors.k2j_x9aa.tmp", ".adapter.safetensors.0abc1234.tmp"]
    for name in torn:
        (folder / name).write_bytes(b"")  # what a kill during atomic_write leaves
    assert cli.main(train_argv(folder, base, toy_files)) == 0
    assert not any((folder / name).exists() for name in torn)
    assert not list(folder.glob(".*.tmp"))


def test_a_second_run_is_refused_while_the_first_holds_the_folder(
    tmp_path, base, toy_files, artifact, capsys
):
    folder = tmp_path / "busy"
    held, done = threading.Event(), threading.Event()

    def first_run() -> None:  # holds the folder as a training run does, until told to stop
        with folders.training_folder(folder):
            held.set()
            done.wait(60)

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert held.wait(60)
        pid = f"PID {os.getpid()}"
        refused(train_argv(folder, base, toy_files), capsys, str(folder), "in use", pid)
        merge = ["merge", "--artifact", str(artifact), "--output", str(folder)]
        refused(merge, capsys, str(folder), "in use", pid)
    finally:
        done.set()
        thread.join()
    assert os.listdir(folder) == []  # released and removed
    # A run killed with -9 leaves its lock file behind, but the kernel has released its lock.
    (folder / folders.LOCK_FILE).write_text("999999999\n")
    assert cli.main(train_argv(folder, base, toy_files)) == 0
    assert not (folder / folders.LOCK_FILE).exists()


def test_merge_never_writes_over_the_base_model_or_the_artifact(artifact, base, capsys):
    keep = {folder: snapshot(folder) for folder in (base, artifact)}
    for output, expected in (
        (base, "is the base model's folder"),
        (artifact, "is the artifact's folder"),
        (artifact.parent, "contains the artifact's folder"),
    ):
        for extra in ((), ("--overwrite",)):
            for command in ("merge", "export"):
                argv = [command, "--artifact", str(artifact), "--output", str(output), *extra]
                refused(argv, capsys, expected)
    # The base named with --model as well as the one the artifact names.
    refused(
        ["merge", "--artifact", str(artifact), "--model", str(base), "--output", str(base)],
        capsys,
        "is the base model's folder",
    )
    assert {folder: snapshot(folder) for folder in (base, artifact)} == keep


def test_merge_refuses_a_folder_that_is_not_empty_unless_overwrite(
    artifact, user_folder, tmp_path, capsys
):
    before = snapshot(user_folder)
    merge = ["merge", "--artifact", str(artifact), "--output", str(user_folder)]
    refused(merge, capsys, "is not empty (metrics.json, notes.txt)", "--overwrite")
    assert snapshot(user_folder) == before
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "config.json").write_text("{}")
    refused(
        ["merge", "--artifact", str(artifact), "--output", str(model_folder)],
        capsys,
        "holds a model (config.json)",
    )
    assert snapshot(model_folder) == {"config.json": b"{}"}
    # --overwrite never deletes the user's files (issue 23); it replaces an earlier export whole.
    refused([*merge, "--overwrite"], capsys, "holds files microtune did not write")
    assert snapshot(user_folder) == before
    export = tmp_path / "export"
    assert cli.main(["merge", "--artifact", str(artifact), "--output", str(export)]) == 0
    assert (
        cli.main(["merge", "--artifact", str(artifact), "--output", str(export), "--overwrite"])
        == 0
    )
    assert json.loads((export / "microtune_export.json").read_text())["method"] == "slash"


def test_a_merged_folder_appears_whole_with_the_usual_permissions(artifact, tmp_path, capsys):
    output = tmp_path / "out" / "merged"
    assert cli.main(["merge", "--artifact", str(artifact), "--output", str(output)]) == 0
    assert (output / "0_Transformer" / "model.safetensors").is_file()  # sentence-transformers
    for path in [output, *output.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert sorted(os.listdir(output.parent)) == ["merged"]  # no staging or lock left beside it
    capsys.readouterr()


def test_a_failed_merge_leaves_nothing_half_written(artifact, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")  # a first file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    parent = tmp_path / "exports"
    parent.mkdir()
    merge = ["merge", "--artifact", str(artifact), "--output", str(parent / "merged")]
    refused(merge, capsys, "No space left on device")
    assert os.listdir(parent) == []  # no output folder, no staging folder, no lock
    # Replacing an existing model: the old one is kept whole.
    earlier = sealed_export(parent / "merged", {"model.safetensors": b"old weights"})
    refused([*merge, "--overwrite"], capsys, "No space left on device")
    assert os.listdir(parent) == ["merged"]
    assert snapshot(parent / "merged") == earlier


def test_save_pretrained_follows_the_same_rules(artifact, user_folder, tmp_path):
    import microtune

    model = microtune.load(artifact)
    for folder, expected in ((artifact, "is the artifact's folder"), (user_folder, "not empty")):
        with pytest.raises(MicrotuneError, match=expected):
            model.save_pretrained(folder)
    assert not model.merged  # refused before merging in place
    with pytest.raises(MicrotuneError, match="did not write"):
        model.save_pretrained(user_folder, overwrite=True)
    export = tmp_path / "export"
    assert model.save_pretrained(export) == "sentence-transformers"
    assert model.save_pretrained(export, overwrite=True) == "sentence-transformers"
    assert (export / "modules.json").is_file()


def test_an_interrupted_export_leaves_nothing_and_frees_the_folder(tmp_path):
    output = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt), folders.model_folder(output) as staging:
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with folders.model_folder(output) as staging:  # the lock was released
        (staging / "config.json").write_text("{}")
    assert os.listdir(output) == ["config.json"]


def test_a_killed_export_is_cleaned_and_the_folder_it_was_replacing_put_back(tmp_path):
    partial = tmp_path / ".merged.partial-x1"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    replaced = tmp_path / ".merged.old-y2" / "folder"  # killed between the two renames
    replaced.mkdir(parents=True)
    (replaced / "model.safetensors").write_bytes(b"old weights")
    with (
        pytest.raises(MicrotuneError, match="holds a model"),
        folders.model_folder(tmp_path / "merged"),
    ):
        pass
    assert os.listdir(tmp_path) == ["merged"]
    assert snapshot(tmp_path / "merged") == {"model.safetensors": b"old weights"}
