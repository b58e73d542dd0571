"""Export folders checked against what the export wrote (issue 32): the SHA-256 of every file
in microtune_export.json, and the record's own hash. A replaced, edited or garbage file, an
edited record, a graph whose weights live outside the folder and a loader file the export never
wrote are refused in one line by `predict --model-folder`; `--overwrite` replaces only a folder
holding nothing but an export's files, for every format (merged, ONNX, peft)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

import microtune
from microtune.cli import main
from microtune.common.files import EXPORT_FILE, write_json
from microtune.common.manifest import RECORD_HASH_KEY, seal_record
from microtune.errors import MicrotuneError
from tests.conftest import error_lines

TEXTS = "the film is good\na dull plot\nlove it , great fun\n"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dirs, toy_files) -> dict[str, Path]:
    """A SLaSh artifact on the tiny BERT and its exports: merged (sentence-transformers),
    peft, ONNX float32 and ONNX int8 (another graph of the same size and inputs)."""
    root = tmp_path_factory.mktemp("exports")
    dev = toy_files / "dev.jsonl"
    train = [
        "train", "--task", "classification", "--model", tiny_model_dirs["bert"],
        "--train-file", toy_files / "train.jsonl", "--dev-file", dev, "--text-columns",
        "sentence", "--label-column", "label", "--method", "slash", "--max-steps", "4",
        "--batch-size", "16", "--eval-every", "0", "--no-progress", "--output", root / "artifact",
    ]  # fmt: skip
    assert main([str(a) for a in train]) == 0
    found = {"artifact": root / "artifact", "texts": root / "texts.txt", "dev": dev}
    found["texts"].write_text(TEXTS)
    for name, extra in (
        ("merged", ["--format", "merged"]),
        ("peft", ["--format", "peft"]),
        ("onnx", ["--format", "onnx"]),
        ("int8", ["--format", "onnx", "--quantize", "int8"]),
    ):
        export = ["export", "--artifact", found["artifact"], "--output", root / name]
        export += ["--data-file", dev, "--check-examples", "8", *extra]
        assert main([str(a) for a in export]) == 0
        found[name] = root / name
    return found


def copy_of(exports, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exports[name], tmp_path / name))


def predict_refuses(capsys, exports, folder: Path, *expected: str) -> None:
    """`predict --model-folder` exits 2 with one line holding `expected`, and writes nothing."""
    before = snapshot(folder)
    code, out, err = run_cli(
        capsys, "predict", "--model-folder", folder, "--input", exports["texts"]
    )
    assert code == 2 and out == "", (code, out, err[-2000:])
    lines = error_lines(err)  # predict's "loading …" status line aside
    assert len(lines) == 1 and lines[0].startswith("microtune: error:"), err
    for text in expected:
        assert text in lines[0], err
    assert snapshot(folder) == before


def edit_record(folder: Path, change, reseal: bool = False) -> None:
    record = json.loads((folder / EXPORT_FILE).read_text())
    change(record)
    if reseal:  # as a user who recomputes the hashes: what the loader itself must then refuse
        record = seal_record({k: v for k, v in record.items() if k != RECORD_HASH_KEY}, folder)
    write_json(folder / EXPORT_FILE, record)


def test_an_intact_export_predicts_and_its_record_lists_every_file(exports, capsys):
    for name in ("merged", "peft", "onnx", "int8"):
        record = json.loads((exports[name] / EXPORT_FILE).read_text())
        on_disk = {
            p.relative_to(exports[name]).as_posix()
            for p in exports[name].rglob("*")
            if p.is_file() and p.name != EXPORT_FILE
        }
        assert set(record["files"]) == on_disk and on_disk, name
        assert all(v.startswith("sha256:") for v in record["files"].values())
    code, out, err = run_cli(
        capsys, "predict", "--model-folder", exports["onnx"], "--input", exports["texts"]
    )
    assert code == 0 and len(out.splitlines()) == 3, err


def test_another_tasks_model_onnx_is_refused(exports, tmp_path, capsys):
    folder = copy_of(exports, "onnx", tmp_path)
    shutil.copy(exports["int8"] / "model.onnx", folder / "model.onnx")
    predict_refuses(capsys, exports, folder, "model.onnx is not the file the export wrote")


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["task"].update(label_names=["pos", "neg"]),  # the labels swapped
        lambda r: r.update(readout="first"),
        lambda r: r.pop("files"),  # the list deleted: the record is still its own witness
    ],
    ids=["labels", "readout", "list deleted"],
)
def test_an_edited_record_is_refused(change, exports, tmp_path, capsys):
    folder = copy_of(exports, "onnx", tmp_path)
    edit_record(folder, change)
    predict_refuses(capsys, exports, folder, "microtune_export.json was changed after the export")


def test_a_garbage_model_onnx_is_one_line_even_with_its_hash_recomputed(exports, tmp_path, capsys):
    folder = copy_of(exports, "onnx", tmp_path)
    (folder / "model.onnx").write_bytes(b"\x00garbage" * 64)
    predict_refuses(capsys, exports, folder, "is not the file the export wrote")
    edit_record(folder, lambda r: None, reseal=True)
    predict_refuses(capsys, exports, folder, "onnxruntime cannot load", "model.onnx")


def test_a_graph_whose_weights_lie_outside_the_folder_is_refused(exports, tmp_path, capsys):
    folder = copy_of(exports, "onnx", tmp_path)
    graph = onnx.load(str(folder / "model.onnx"))
    (tmp_path / "outside").mkdir()
    # The weights written beside the folder, the graph pointing there (../outside/w.bin).
    onnx.save_model(
        graph,
        str(tmp_path / "outside" / "model.onnx"),
        save_as_external_data=True,
        location="w.bin",
        size_threshold=0,
    )
    moved = onnx.load(str(tmp_path / "outside" / "model.onnx"), load_external_data=False)
    for tensor in moved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside/w.bin"
    onnx.save_model(moved, str(folder / "model.onnx"))
    predict_refuses(capsys, exports, folder, "is not the file the export wrote")
    edit_record(folder, lambda r: None, reseal=True)
    predict_refuses(capsys, exports, folder, "onnxruntime cannot load")


def test_a_loader_file_the_export_never_wrote_is_refused(exports, tmp_path, capsys):
    """An adapter_config.json dropped beside a merged model: a loader would read it."""
    folder = copy_of(exports, "merged", tmp_path)
    shutil.copy(exports["peft"] / "adapter_config.json", folder / "adapter_config.json")
    predict_refuses(capsys, exports, folder, "adapter_config.json, which the export did not write")
    # The user's own notes are no loader's file: the folder still predicts.
    (folder / "adapter_config.json").unlink()
    (folder / "notes.txt").write_text("mine\n")
    code, out, err = run_cli(
        capsys, "predict", "--model-folder", folder, "--input", exports["texts"]
    )
    assert code == 0 and len(out.splitlines()) == 3, err


def test_a_replaced_head_or_weights_are_refused_for_every_format(exports, tmp_path):
    for name, file in (("merged", "0_Transformer/model.safetensors"), ("peft", "head.safetensors")):
        folder = copy_of(exports, name, tmp_path)
        with open(folder / file, "ab") as handle:
            handle.write(b" ")
        with pytest.raises(MicrotuneError, match=f"{file} is not the file the export wrote"):
            microtune.load(folder)


def test_overwrite_replaces_only_what_an_export_wrote(exports, tmp_path, capsys):
    """--overwrite onto an earlier export holding the user's notes.txt (or a folder of theirs)
    is refused and deletes nothing, for export --format onnx / merged / peft and merge."""
    artifact, dev = exports["artifact"], exports["dev"]
    commands = {
        "export --format onnx": ["export", "--format", "onnx", "--data-file", dev],
        "export --format merged": ["export", "--data-file", dev],
        "export --format peft": ["export", "--format", "peft", "--data-file", dev],
        "merge": ["merge"],
    }
    for earlier in ("onnx", "merged", "peft"):
        folder = copy_of(exports, earlier, tmp_path)
        (folder / "notes.txt").write_text("the user's\n")
        (folder / "mine").mkdir()
        (folder / "mine" / "plot.png").write_bytes(b"png")
        before = snapshot(folder)
        for what, argv in commands.items():
            code, _, err = run_cli(
                capsys, *argv, "--artifact", artifact, "--output", folder, "--overwrite"
            )
            assert code == 2 and len(err.strip().splitlines()) == 1, (what, earlier, err)
            assert "holds files microtune did not write (mine/, notes.txt)" in err, err
            assert snapshot(folder) == before, (what, earlier)
        shutil.rmtree(folder)
    # Nothing but an export's files: replaced, as the help says (by another format too).
    folder = copy_of(exports, "onnx", tmp_path)
    code, out, err = run_cli(
        capsys, "merge", "--artifact", artifact, "--output", folder, "--overwrite"
    )
    assert code == 0, err
    assert json.loads(out)["format"] == "sentence-transformers"
    assert not (folder / "model.onnx").exists()
    assert json.loads((folder / EXPORT_FILE).read_text())["format"] == "sentence-transformers"


def test_overwrite_refuses_an_export_whose_record_lists_no_files(exports, tmp_path, capsys):
    """An export from before the lists (or with its list edited): its files cannot be told from
    the user's, so --overwrite deletes nothing."""
    folder = copy_of(exports, "onnx", tmp_path)
    edit_record(folder, lambda r: [r.pop("files"), r.pop(RECORD_HASH_KEY)])
    before = snapshot(folder)
    code, _, err = run_cli(
        capsys, "merge", "--artifact", exports["artifact"], "--output", folder, "--overwrite"
    )
    assert code == 2 and "lists no files" in err and "delete that folder yourself" in err, err
    assert snapshot(folder) == before
