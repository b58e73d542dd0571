"""Hostile and careless input (issue 12): one table of cases, one uniform assertion.

Every case runs the real command line (`microtune.cli.main` in process; a subprocess where a
signal is the point) in a fresh workspace holding a copy of a tiny artifact, the toy data and
an output folder, with the current folder and the temporary folder inside it too. Each case
asserts the same three outcomes:

1. the exit code: 2 for a refusal, 130 for Ctrl-C, 0 for what must succeed;
2. stderr: for a refusal exactly one line, starting with "microtune: error:" (so no traceback
   and no "internal error"); for Ctrl-C one line starting with "microtune:"; for a success no
   error at all;
3. the user's files: the workspace and the base model's folder are byte-identical afterwards
   and nothing new exists anywhere (a refusal); a success adds files only in the --output it
   was given and changes only microtune's own files there.

The cases are data (`CASES`, counted by kind in `bench/hostile_campaign.py`). What the three
helper test files check in detail (messages, internals) is not repeated here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from microtune import cli

REPO = Path(__file__).resolve().parents[1]
LOCK = ".microtune.lock"
CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = (
    "adapter.safetensors",
    "microtune.json",
    "metrics.json",
    "train_log.jsonl",
    CHECKPOINT,
)

# -- the case table -----------------------------------------------------------------------------

Prepare = Callable[["Workspace"], None]


@dataclass(frozen=True)
class Case:
    """One hostile input and what must come of it.

    Attributes:
        kind: the family of the case (see KINDS).
        name: what the case does, as a short phrase (the test id).
        argv: the command line; {art}, {data}, {out}, {base}, {ws} name the workspace's folders.
        prepare: damages or sets up the workspace before the command runs.
        code: the exit code the command must give.
        expect: text the one error line must hold.
        output: the folder (relative to the workspace) a success may write; only microtune's
            own files may change there.
        hold_lock: a lock file (relative) another process holds while the command runs.
        patch: a failure injected in process (a full disk during a merge).
        how: "cli" (in process), "sigint" (a subprocess interrupted while it imports),
            "killed" (after a training run was killed with -9 mid-run).
        defect: why the case is expected to fail until the code is fixed (strict xfail).
    """

    kind: str
    name: str
    argv: tuple[str, ...]
    prepare: Prepare | None = None
    code: int = 2
    expect: str = ""
    output: str = "out"
    hold_lock: str | None = None
    patch: str | None = None
    how: str = "cli"
    defect: str | None = None


KINDS = {
    "artifact-json": "artifact microtune.json field corruptions",
    "artifact-tensor": "artifact tensor-file corruptions",
    "data-file": "data-file corruptions",
    "output-folder": "output-folder hazards",
    "concurrent": "concurrent runs, Ctrl-C and kill -9",
    "numerics": "the numerics guard",
    "options": "bad option values",
}


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


TRAIN = "train --task sst2 --method slash --d 8 --model {base} --data-dir {data} --batch-size 8 "
TRAIN += "--eval-every 0 --no-progress --output {out}"
STEPS = " --max-steps 2"


def train(extra: str = "", *, steps: bool = True, task: str = "sst2", method: str = "slash"):
    line = TRAIN.replace("--task sst2", f"--task {task}").replace(
        "--method slash", f"--method {method}"
    )
    if method != "slash":
        line = line.replace(" --d 8", "")
    return words(line + (STEPS if steps else "") + " " + extra)


ARTIFACT_COMMANDS = {
    "info": "info --artifact {art}",
    "eval": "eval --artifact {art} --data-dir {data}",
    "predict": "predict --artifact {art} --input {data}/inputs.txt",
    "merge": "merge --artifact {art} --output {out}",
    "export": "export --artifact {art} --output {out} --data-dir {data} --check-examples 8",
}


def each_artifact_command(index: int) -> tuple[str, tuple[str, ...]]:
    """The artifact commands in turn, so that every check is reached through each of them."""
    name = list(ARTIFACT_COMMANDS)[index % len(ARTIFACT_COMMANDS)]
    return name, words(ARTIFACT_COMMANDS[name])


# -- workspace edits (the `prepare` functions) --------------------------------------------------


def _walk(data: dict, path: str):
    keys = path.split(".")
    for key in keys[:-1]:
        data = data[key]
    return data, keys[-1]


def edit_config(path: str, value=None, *, delete: bool = False) -> Prepare:
    def prepare(ws: Workspace) -> None:
        file = ws.art / "microtune.json"
        config = json.loads(file.read_text())
        parent, key = _walk(config, path) if path else (None, None)
        if delete:
            del parent[key]
        elif parent is None:
            config = value
        else:
            parent[key] = value
        file.write_text(json.dumps(config))  # NaN and infinity as JavaScript literals

    return prepare


def config_bytes(damage: Callable[[bytes], bytes]) -> Prepare:
    def prepare(ws: Workspace) -> None:
        file = ws.art / "microtune.json"
        file.write_bytes(damage(file.read_bytes()))

    return prepare


def rehash(ws: Workspace) -> None:
    """Make microtune.json name the tensor file's new hash, as a careful forger would."""
    file = ws.art / "microtune.json"
    config = json.loads(file.read_text())
    digest = hashlib.sha256((ws.art / "adapter.safetensors").read_bytes()).hexdigest()
    config["tensors_sha256"] = f"sha256:{digest}"
    file.write_text(json.dumps(config))


def edit_tensors(change: Callable[[dict], dict], *, fix_hash: bool = True) -> Prepare:
    def prepare(ws: Workspace) -> None:
        file = ws.art / "adapter.safetensors"
        save_file(change(load_file(file)), file)
        if fix_hash:
            rehash(ws)

    return prepare


def tensor_bytes(damage: Callable[[bytes], bytes], *, fix_hash: bool = True) -> Prepare:
    def prepare(ws: Workspace) -> None:
        file = ws.art / "adapter.safetensors"
        file.write_bytes(damage(file.read_bytes()))
        if fix_hash:
            rehash(ws)

    return prepare


def replaced(name: str, make: Callable[[torch.Tensor], torch.Tensor | None]):
    def change(tensors: dict) -> dict:
        value = make(tensors[name])
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
        return tensors

    return change


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def huge_header(data: bytes) -> bytes:
    return (1 << 60).to_bytes(8, "little") + data[8:]


def write(relative: str, content: str | bytes) -> Prepare:
    def prepare(ws: Workspace) -> None:
        path = ws.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return prepare


def remove(relative: str) -> Prepare:
    def prepare(ws: Workspace) -> None:
        path = ws.root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return prepare


def link(relative: str, target: Callable[[Workspace], Path]) -> Prepare:
    def prepare(ws: Workspace) -> None:
        path = ws.root / relative
        if path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target(ws))

    return prepare


def both(*steps: Prepare) -> Prepare:
    def prepare(ws: Workspace) -> None:
        for step in steps:
            step(ws)

    return prepare


def copy_in(source: str, relative: str = "out") -> Prepare:
    """Copy a module-level run (the artifact, the killed or interrupted run) into the workspace."""

    def prepare(ws: Workspace) -> None:
        shutil.copytree(ws.sources[source], ws.root / relative)

    return prepare


def rows(*items) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


SST2_TRAIN = "data/glue/sst2/train.jsonl"
SST2_DEV = "data/glue/sst2/validation.jsonl"
STSB_DEV = rows(*({"sentence1": "a film", "sentence2": "the movie", "label": 2.5},) * 8)


def stsb_train(label_text: str) -> Prepare:
    good = json.dumps({"sentence1": "a film", "sentence2": "the movie", "label": 1.0})
    bad = f'{{"sentence1": "a film", "sentence2": "bad", "label": {label_text}}}'
    return both(
        write("data/glue/stsb/train.jsonl", "\n".join([good] * 7 + [bad]) + "\n"),
        write("data/glue/stsb/validation.jsonl", STSB_DEV),
    )


# -- the cases, by kind -------------------------------------------------------------------------

# (a) microtune.json: missing keys, wrong types, out-of-bounds sizes, paths, hand edits.
_JSON_EDITS: list[tuple[str, Prepare, str, str | None]] = [
    ("method deleted", edit_config("method", delete=True), "method", None),
    ("tensors_sha256 deleted", edit_config("tensors_sha256", delete=True), "tensors_sha256", None),
    ("head deleted", edit_config("head", delete=True), "head", None),
    (
        "base_model.fingerprint deleted",
        edit_config("base_model.fingerprint", delete=True),
        "",
        None,
    ),
    ("d as a string", edit_config("method_config.d", "8"), "method_config.d", None),
    ("d as a bool", edit_config("method_config.d", True), "method_config.d", None),
    ("d = 10^12", edit_config("method_config.d", 10**12), "method_config.d", None),
    ("d = 0", edit_config("method_config.d", 0), "method_config", None),
    (
        "num_labels = 10^9",
        both(edit_config("head.num_labels", 10**9), edit_config("task.num_labels", 10**9)),
        "num_labels",
        None,
    ),
    ("head and task num_labels differ", edit_config("task.num_labels", 3), "labels", None),
    ("max_length 0", edit_config("max_length", 0), "max_length", None),
    ("max_length 10^9", edit_config("max_length", 10**9), "max_length", None),
    ("max_length past the position table", edit_config("max_length", 1000), "max_length", None),
    ("task.name with ../", edit_config("task.name", "../../outside"), "task.name", None),
    ("task.dev_split with ../", edit_config("task.dev_split", "../outside"), "dev_split", None),
    ("task.dev_split absolute", edit_config("task.dev_split", "/etc/passwd"), "dev_split", None),
    ("read-out unknown", edit_config("head.readout", "sideways"), "readout", None),
    ("method unknown", edit_config("method", "magic"), "method", None),
    ("format_version 99", edit_config("format_version", 99), "format version", None),
    ("format not microtune's", edit_config("format", "other"), "format", None),
    (
        "projection_std_scale NaN",
        edit_config("method_config.projection_std_scale", math.nan),
        "",
        None,
    ),
    (
        "projection_std_scale inf",
        edit_config("method_config.projection_std_scale", math.inf),
        "",
        None,
    ),
    ("head_dropout 1.5", edit_config("head.head_dropout", 1.5), "head_dropout", None),
    (
        "projection_seed -1",
        edit_config("method_config.projection_seed", -1),
        "projection_seed",
        None,
    ),
    (
        "projection_seed 2^70",
        edit_config("method_config.projection_seed", 2**70),
        "projection_seed",
        None,
    ),
    ("an unknown key", edit_config("surprise", 1), "surprise", None),
    ("an unknown method option", edit_config("method_config.rank", 4), "rank", None),
    ("method_state on slash", edit_config("method_state", {"k": 1}), "method_state", None),
    ("parameters.total wrong", edit_config("parameters.trained.total", 1), "total", None),
    ("base dtype unknown", edit_config("base_model.dtype", "float8"), "dtype", None),
    (
        "label_names of another length",
        edit_config("task.label_names", ["a", "b", "c"]),
        "label_names",
        None,
    ),
    (
        "base fingerprint of another model",
        edit_config("base_model.fingerprint", "sha256:" + "0" * 64),
        "base model mismatch",
        None,
    ),
    ("base model missing", edit_config("base_model.name", "/nonexistent/model"), "", None),
    ("a JSON array", edit_config("", [1, 2]), "not a JSON object", None),
    ("truncated", config_bytes(lambda b: b[: len(b) // 2]), "not valid JSON", None),
    ("empty", config_bytes(lambda b: b""), "not valid JSON", None),
    ("not UTF-8", config_bytes(lambda b: b"\xff\xfe" + b), "", None),
    ("deleted", remove("artifact/microtune.json"), "not a microtune artifact", None),
    # Valid values the artifact was not trained with: only a record of the config can tell.
    (
        "projection_seed changed (a valid value)",
        edit_config("method_config.projection_seed", 1),
        "",
        "microtune.json is not covered by any hash: a hand-edited valid value (projection seed, "
        "read-out, label names) loads and gives other predictions with exit 0",
    ),
    (
        "label_names swapped (valid values)",
        edit_config("task.label_names", ["positive", "negative"]),
        "",
        "microtune.json is not covered by any hash: swapped label names relabel every "
        "prediction with exit 0",
    ),
]


def _artifact_json_cases() -> list[Case]:
    cases = []
    for index, (name, prepare, expect, defect) in enumerate(_JSON_EDITS):
        command, argv = each_artifact_command(index)
        if defect:  # predict shows the label names, eval the metric: both change silently
            command, argv = "predict", words(ARTIFACT_COMMANDS["predict"])
        cases.append(
            Case("artifact-json", f"{command}: {name}", argv, prepare, expect=expect, defect=defect)
        )
    return cases


# (b) the tensor file: bytes changed without and with the hash updated, dtypes, shapes, names.
Z, W, B = "method.z", "head.linear.weight", "head.linear.bias"
_TENSOR_EDITS: list[tuple[str, Prepare, str]] = [
    ("a byte changed, hash kept", tensor_bytes(flip_last_byte, fix_hash=False), "does not match"),
    ("deleted", remove("artifact/adapter.safetensors"), "missing"),
    ("z as int64", edit_tensors(replaced(Z, lambda t: t.to(torch.int64))), Z),
    ("z as bool", edit_tensors(replaced(Z, lambda t: t > 0)), Z),
    ("z as float16", edit_tensors(replaced(Z, lambda t: t.half())), Z),
    ("z as float64", edit_tensors(replaced(Z, lambda t: t.double())), Z),
    ("z one longer", edit_tensors(replaced(Z, lambda t: torch.cat([t, t[:1]]))), Z),
    ("z a scalar", edit_tensors(replaced(Z, lambda t: t[0].clone())), Z),
    ("z empty", edit_tensors(replaced(Z, lambda t: t[:0].clone())), Z),
    ("head weight transposed", edit_tensors(replaced(W, lambda t: t.t().contiguous())), W),
    ("head bias missing", edit_tensors(replaced(B, lambda t: None)), B),
    ("z missing", edit_tensors(replaced(Z, lambda t: None)), Z),
    (
        "an extra tensor",
        edit_tensors(lambda d: {**d, "method.extra": torch.zeros(3)}),
        "method.extra",
    ),
    ("z NaN", edit_tensors(replaced(Z, lambda t: torch.full_like(t, math.nan))), "NaN"),
    ("head weight inf", edit_tensors(replaced(W, lambda t: torch.full_like(t, math.inf))), "NaN"),
    ("truncated", tensor_bytes(lambda b: b[: len(b) // 2]), "safetensors"),
    ("empty", tensor_bytes(lambda b: b""), "safetensors"),
    ("garbage", tensor_bytes(lambda b: os.urandom(len(b))), "safetensors"),
    ("a header claiming 2^60 bytes", tensor_bytes(huge_header), "safetensors"),
    (
        "a header that is not JSON",
        tensor_bytes(lambda b: b[:8] + b"\xff" * 8 + b[16:]),
        "safetensors",
    ),
]


def _artifact_tensor_cases() -> list[Case]:
    return [
        Case("artifact-tensor", f"{command}: {name}", argv, prepare, expect=expect)
        for index, (name, prepare, expect) in enumerate(_TENSOR_EDITS)
        for command, argv in [each_artifact_command(index)]
    ]


# (c) data files: encodings, shapes, labels, links out of the data folder.
EVAL_FILE = words("eval --artifact {art} --data-file {data}/user.jsonl")
_DATA_EDITS: list[tuple[str, tuple[str, ...], Prepare, str]] = [
    (
        "train: not UTF-8",
        train(),
        write(SST2_TRAIN, b'{"sentence": "caf\xe9", "label": 1}\n'),
        "UTF-8",
    ),
    (
        "train: a JSON array with a non-object",
        train(),
        both(
            remove(SST2_TRAIN),
            write("data/glue/sst2/train.json", '[{"sentence": "a", "label": 1}, 5]'),
        ),
        "",
    ),
    (
        "train: a truncated JSON line",
        train(),
        write(SST2_TRAIN, '{"sentence": "a film", "lab\n'),
        "",
    ),
    ("train: an empty file", train(), write(SST2_TRAIN, ""), ""),
    ("train: a line that is an array", train(), write(SST2_TRAIN, "[1, 2]\n"), ""),
    ("train: no label column", train(), write(SST2_TRAIN, rows({"sentence": "a film"})), "label"),
    (
        "train: no text column",
        train(),
        write(SST2_TRAIN, rows({"text": "a film", "label": 1})),
        "sentence",
    ),
    (
        "train: label 5 for 2 classes",
        train(),
        write(SST2_TRAIN, rows({"sentence": "a", "label": 5})),
        "",
    ),
    ("train: label 1.5", train(), write(SST2_TRAIN, rows({"sentence": "a", "label": 1.5})), ""),
    ("train: label -1", train(), write(SST2_TRAIN, rows({"sentence": "a", "label": -1})), ""),
    (
        "train: label null",
        train(),
        write(SST2_TRAIN, rows({"sentence": "a", "label": None})),
        "label",
    ),
    (
        "train: label true",
        train(),
        write(SST2_TRAIN, rows({"sentence": "a", "label": True})),
        "label",
    ),
    ("train: text null", train(), write(SST2_TRAIN, rows({"sentence": None, "label": 1})), ""),
    (
        "train: text an object",
        train(),
        write(SST2_TRAIN, rows({"sentence": {"a": 1}, "label": 1})),
        "",
    ),
    (
        "train: the file is a folder",
        train(),
        both(remove(SST2_TRAIN), write(SST2_TRAIN + "/x", "")),
        "",
    ),
    ("train: no dev split", train(), remove(SST2_DEV), "validation"),
    (
        "train: a link out of --data-dir",
        train(),
        both(
            write("outside/secret.jsonl", rows({"sentence": "a", "label": 1})),
            link(SST2_TRAIN, lambda ws: ws.root / "outside" / "secret.jsonl"),
        ),
        "outside --data-dir",
    ),
    (
        "train: CSV without the label column",
        train(),
        both(remove(SST2_TRAIN), write("data/glue/sst2/train.csv", "sentence\na film\n")),
        "label",
    ),
    (
        "train: ragged TSV",
        train(),
        both(
            remove(SST2_TRAIN), write("data/glue/sst2/train.tsv", "sentence\tlabel\na\t1\tb\nc\n")
        ),
        "",
    ),
    ("eval: --data-file missing", EVAL_FILE, None, "user.jsonl"),
    ("eval: --data-file not UTF-8", EVAL_FILE, write("data/user.jsonl", b"\xff\xfe\x00"), ""),
    ("eval: --data-file a folder", EVAL_FILE, write("data/user.jsonl/x", ""), ""),
    (
        "predict: --input not UTF-8",
        words("predict --artifact {art} --input {data}/user.txt"),
        write("data/user.txt", b"caf\xe9\n"),
        "",
    ),
    (
        "predict: a JSON input without the text column",
        words("predict --artifact {art} --input {data}/user.txt"),
        write("data/user.txt", '{"text": "a film"}\n'),
        "sentence",
    ),
    (
        "train: --train-file without --dev-file",
        words(TRAIN.replace("--data-dir {data}", "--train-file {data}/glue/sst2/train.jsonl")),
        None,
        "together",
    ),
]


def _data_file_cases() -> list[Case]:
    return [
        Case("data-file", name, argv, prepare, expect=expect)
        for name, argv, prepare, expect in _DATA_EDITS
    ]


# (d) output folders.
MERGE = "merge --artifact {art} --output "


def _user_folder(relative: str = "out") -> Prepare:
    return both(
        write(f"{relative}/notes.txt", "my notes\n"),
        write(f"{relative}/metrics.json", '{"mine": 1}\n'),
    )


def _disk_full_in_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up after the merged model's first file is written."""
    from transformers import PreTrainedModel

    def disk_full(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(
            errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors")
        )

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)


PATCHES = {"disk full in save_pretrained": _disk_full_in_save}

_FOLDER_CASES: list[Case] = [
    Case("output-folder", "train --output ''", (*train(), "--output", ""), expect="empty"),
    Case("output-folder", "train --output '   '", (*train(), "--output", "   "), expect="empty"),
    Case("output-folder", "merge --output ''", (*words(MERGE), ""), expect="empty"),
    Case(
        "output-folder",
        "export --output ''",
        words("export --artifact {art} --data-dir {data} --output") + ("",),
        expect="empty",
    ),
    Case(
        "output-folder",
        "train --output a file",
        (*train(), "--output", "{ws}/file.txt"),
        write("file.txt", "mine\n"),
        expect="is a file",
    ),
    Case(
        "output-folder",
        "train --output under a file",
        (*train(), "--output", "{ws}/file.txt/run"),
        write("file.txt", "mine\n"),
        expect="is a file",
    ),
    Case(
        "output-folder",
        "merge --output under a file",
        words(MERGE + "{ws}/file.txt/m"),
        write("file.txt", "mine\n"),
        expect="is a file",
    ),
    Case(
        "output-folder",
        "export --output a file",
        words("export --artifact {art} --data-dir {data} --output {ws}/file.txt"),
        write("file.txt", "mine\n"),
        expect="is a file",
    ),
    Case(
        "output-folder",
        "train into the user's files",
        train(),
        _user_folder(),
        expect="did not write",
    ),
    Case(
        "output-folder",
        "train --resume into the user's files",
        train("--resume"),
        _user_folder(),
        expect="did not write",
    ),
    Case(
        "output-folder",
        "train --overwrite beside the user's files",
        train("--overwrite"),
        _user_folder(),
        code=0,
    ),
    Case(
        "output-folder",
        "train over another run's artifact",
        train("--seed 1"),
        copy_in("artifact"),
        expect="finished artifact",
    ),
    Case(
        "output-folder",
        "train --resume over a finished artifact",
        train("--resume"),
        copy_in("artifact"),
        expect="finished artifact",
    ),
    Case(
        "output-folder",
        "train --overwrite over another run's artifact",
        train("--overwrite"),
        copy_in("artifact"),
        code=0,
    ),
    Case(
        "output-folder",
        "train over an unfinished run's checkpoint",
        train("--max-steps 4 --checkpoint-every 2"),
        copy_in("interrupted"),
        expect="--resume",
    ),
    Case(
        "output-folder",
        "train --resume --overwrite",
        train("--max-steps 4 --checkpoint-every 2 --resume --overwrite"),
        copy_in("interrupted"),
        expect="only one",
    ),
    Case(
        "output-folder",
        "train --resume an interrupted run",
        train("--max-steps 4 --checkpoint-every 2 --resume"),
        copy_in("interrupted"),
        code=0,
    ),
    Case(
        "output-folder",
        "train --output the base model's folder",
        (*train(), "--output", "{base}"),
        expect="base model",
    ),
    Case(
        "output-folder",
        "train --output a link to the base model",
        (*train(), "--output", "{ws}/link"),
        link("link", lambda ws: ws.base),
        expect="base model",
    ),
    Case(
        "output-folder",
        "merge --output the base model's folder",
        words(MERGE + "{base}"),
        expect="base model",
    ),
    Case(
        "output-folder",
        "merge --overwrite the base model's folder",
        words(MERGE + "{base} --overwrite"),
        expect="base model",
    ),
    Case(
        "output-folder",
        "export --output the base model's folder",
        words("export --artifact {art} --data-dir {data} --output {base} --overwrite"),
        expect="base model",
    ),
    Case(
        "output-folder",
        "merge --output a link to the base model",
        words(MERGE + "{ws}/link --overwrite"),
        link("link", lambda ws: ws.base),
        expect="base model",
    ),
    Case(
        "output-folder",
        "merge --output the base model's parent",
        words(MERGE + "{base}/.. --overwrite"),
        expect="base model",
    ),
    Case(
        "output-folder",
        "merge --output the artifact's folder",
        words(MERGE + "{art} --overwrite"),
        expect="artifact",
    ),
    Case(
        "output-folder",
        "merge --output the artifact's parent",
        words(MERGE + "{ws} --overwrite"),
        expect="artifact",
    ),
    Case(
        "output-folder",
        "merge into a folder holding a model",
        words(MERGE + "{out}"),
        write("out/config.json", "{}"),
        expect="holds a model",
    ),
    Case(
        "output-folder",
        "merge into a folder holding safetensors",
        words(MERGE + "{out}"),
        write("out/model.safetensors", b"weights"),
        expect="holds a model",
    ),
    Case(
        "output-folder",
        "merge into the user's files",
        words(MERGE + "{out}"),
        _user_folder(),
        expect="not empty",
    ),
    Case(
        "output-folder",
        "merge with a full disk",
        words(MERGE + "{out}/merged"),
        write("out/keep.txt", "mine\n"),
        expect="No space left",
        patch="disk full in save_pretrained",
    ),
    Case(
        "output-folder",
        "merge --overwrite a model with a full disk",
        words(MERGE + "{out} --overwrite"),
        write("out/model.safetensors", b"old weights"),
        expect="No space left",
        patch="disk full in save_pretrained",
    ),
    Case("output-folder", "merge into a new folder", words(MERGE + "{out}/merged"), code=0),
    Case(
        "output-folder",
        "train after a kill left torn .tmp files",
        train(),
        write("out/.adapter.safetensors.k2j_x9aa.tmp", b""),
        code=0,
    ),
]

# (e) a second run on a folder another process holds; Ctrl-C; kill -9 then a restart.
_CONCURRENT_CASES: list[Case] = [
    Case(
        "concurrent",
        "train on a folder another run holds",
        train(),
        write("out/.keep", ""),
        expect="in use",
        hold_lock="out/" + LOCK,
    ),
    Case(
        "concurrent",
        "train --overwrite on a folder another run holds",
        train("--overwrite"),
        write("out/.keep", ""),
        expect="in use",
        hold_lock="out/" + LOCK,
    ),
    Case(
        "concurrent",
        "merge into a folder a training run holds",
        words(MERGE + "{out} --overwrite"),
        write("out/.keep", ""),
        expect="in use",
        hold_lock="out/" + LOCK,
    ),
    Case(
        "concurrent",
        "merge into a folder another export holds",
        words(MERGE + "{out}/merged"),
        expect="in use",
        hold_lock="out/.merged" + LOCK,
    ),
    Case(
        "concurrent",
        "train beside a stale lock file of a killed run",
        train(),
        write("out/" + LOCK, "999999999\n"),
        code=0,
    ),
    Case("concurrent", "Ctrl-C while starting up", words("info"), code=130, how="sigint"),
    Case(
        "concurrent",
        "restart after kill -9, without --resume",
        train("--max-steps 4 --checkpoint-every 1"),
        copy_in("killed"),
        expect="--resume",
        how="killed",
    ),
    Case(
        "concurrent",
        "restart after kill -9, --resume",
        train("--max-steps 4 --checkpoint-every 1 --resume"),
        copy_in("killed"),
        code=0,
        how="killed",
    ),
    Case(
        "concurrent",
        "Ctrl-C mid-training, then --resume",
        train("--max-steps 4 --checkpoint-every 2 --resume"),
        copy_in("interrupted"),
        code=0,
    ),
]

# (f) the numerics guard: divergence, non-finite options and labels.
_NUMERICS_CASES: list[Case] = [
    Case(
        "numerics",
        "full --lr 1e6 diverges",
        train("--lr 1e6 --max-steps 6", method="full"),
        expect="diverged",
    ),
    Case(
        "numerics",
        "bitfit --lr 1e6 diverges",
        train("--lr 1e6 --max-steps 6", method="bitfit"),
        expect="diverged",
    ),
    Case(
        "numerics",
        "slash --projection-std-scale 1e30",
        train("--projection-std-scale 1e30"),
        expect="diverged",
    ),
    Case("numerics", "--lr inf", train("--lr inf"), expect="--lr"),
    Case("numerics", "--lr nan", train("--lr nan"), expect="--lr"),
    Case("numerics", "--lr 1e30", train("--lr 1e30"), expect="--lr"),
    Case(
        "numerics",
        "--projection-std-scale inf",
        train("--projection-std-scale inf"),
        expect="projection",
    ),
    Case(
        "numerics",
        "--projection-std-scale nan",
        train("--projection-std-scale nan"),
        expect="projection",
    ),
    Case("numerics", "--head-dropout nan", train("--head-dropout nan"), expect="dropout"),
    Case("numerics", "--warmup-ratio nan", train("--warmup-ratio nan"), expect="warmup"),
    Case("numerics", "stsb label NaN", train(task="stsb"), stsb_train("NaN"), expect="finite"),
    Case("numerics", 'stsb label "nan"', train(task="stsb"), stsb_train('"nan"'), expect="finite"),
    Case(
        "numerics",
        "stsb label Infinity",
        train(task="stsb"),
        stsb_train("Infinity"),
        expect="finite",
    ),
    Case(
        "numerics", 'stsb label "-inf"', train(task="stsb"), stsb_train('"-inf"'), expect="finite"
    ),
    Case(
        "numerics", 'stsb label "1e999"', train(task="stsb"), stsb_train('"1e999"'), expect="finite"
    ),
]

# (g) option values out of range.
_OPTION_VALUES: list[tuple[str, str, str]] = [
    ("--epochs inf", "--epochs inf", "--epochs"),
    ("--epochs nan", "--epochs nan", "--epochs"),
    ("--epochs 0", "--epochs 0", "--epochs"),
    ("--epochs -1", "--epochs -1", "--epochs"),
    ("--weight-decay -1", "--weight-decay -1", "--weight-decay"),
    ("--weight-decay inf", "--weight-decay inf", "--weight-decay"),
    ("--seed 2^70", f"--seed {2**70}", "--seed"),
    ("--seed -1", "--seed -1", "--seed"),
    ("--grad-accum 1000 on 96 examples", "--grad-accum 1000", "--grad-accum"),
    ("--grad-accum 0", "--grad-accum 0", "--grad-accum"),
    ("--batch-size 0", "--batch-size 0", "--batch-size"),
    ("--batch-size -3", "--batch-size -3", "--batch-size"),
    ("--max-length 0", "--max-length 0", "--max-length"),
    ("--max-length 10^6", "--max-length 1000000", "--max-length"),
    ("--max-steps 0", "--max-steps 0", "--max-steps"),
    ("--warmup-ratio 1", "--warmup-ratio 1", "--warmup-ratio"),
    ("--lr 0", "--lr 0", "--lr"),
    ("--lr -1", "--lr -1", "--lr"),
    ("--d 0", "--d 0", "d"),
    ("--d -5", "--d -5", "d"),
    ("--d 10^12", f"--d {10**12}", "d"),
    ("--projection-seed -1", "--projection-seed -1", "seed"),
    ("--max-train-examples 0", "--max-train-examples 0", "--max-train-examples"),
    ("--eval-every -1", "--eval-every -1", "--eval-every"),
    ("--checkpoint-every -1", "--checkpoint-every -1", "--checkpoint-every"),
    ("--head-dropout 1", "--head-dropout 1", "dropout"),
    ("--device banana", "--device banana", "device"),
    ("--dp-epsilon -1", "--dp-epsilon -1", "epsilon"),
    ("--dp-epsilon inf", "--dp-epsilon inf", "epsilon"),
    ("--dp-delta 2", "--dp-epsilon 8 --dp-delta 2", "delta"),
]
_OPTION_CASES: list[Case] = [
    *(
        Case("options", name, train(extra, steps=not extra.startswith("--epochs")), expect=expect)
        for name, extra, expect in _OPTION_VALUES
    ),
    Case("options", "train --device cuda without a GPU", train("--device cuda"), expect="GPU"),
    Case(
        "options",
        "predict --batch-size 0",
        words("predict --artifact {art} --input {data}/inputs.txt --batch-size 0"),
        expect="--batch-size",
    ),
    Case(
        "options",
        "eval --split with ../",
        words("eval --artifact {art} --data-dir {data} --split ../x"),
        expect="split",
    ),
    Case(
        "options",
        "eval --task cola on an sst2 artifact",
        words("eval --artifact {art} --data-dir {data} --task cola"),
        expect="cola",
    ),
    Case(
        "options",
        "export --check-examples 0",
        words("export --artifact {art} --data-dir {data} --output {out}/m --check-examples 0"),
        expect="examples",
    ),
    Case(
        "options",
        "export --check-examples -1",
        words("export --artifact {art} --data-dir {data} --output {out}/m --check-examples -1"),
        expect="examples",
    ),
    *(
        Case(
            "options",
            f"argparse: {name}",
            train(extra),
            defect="argparse's own errors print the whole usage (tens of lines) and 'microtune train: "
            "error:', not one 'microtune: error:' line",
        )
        for name, extra in (
            ("--seed abc", "--seed abc"),
            ("--readout sideways", "--readout sideways"),
            ("--max-steps 1.5", "--max-steps 1.5"),
        )
    ),
]

CASES: list[Case] = [
    *_artifact_json_cases(),
    *_artifact_tensor_cases(),
    *_data_file_cases(),
    *_FOLDER_CASES,
    *_CONCURRENT_CASES,
    *_NUMERICS_CASES,
    *_OPTION_CASES,
]


def counts_by_kind() -> dict[str, int]:
    """How many cases of each kind the suite runs (for the campaign's summary)."""
    return {kind: sum(case.kind == kind for case in CASES) for kind in KINDS}


# -- the workspace ------------------------------------------------------------------------------


@dataclass
class Workspace:
    """One case's folders: the artifact, the data, the output, the current and temp folders."""

    root: Path
    base: Path
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def art(self) -> Path:
        return self.root / "artifact"

    def format(self, argv: tuple[str, ...]) -> list[str]:
        names = {
            "art": str(self.art),
            "data": str(self.root / "data"),
            "out": str(self.root / "out"),
            "base": str(self.base),
            "ws": str(self.root),
        }
        return [arg.format(**names) for arg in argv]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every path under the folders (hidden ones too) → its content hash, 'dir', or its link."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(root) / name
                key = str(path)
                if path.is_symlink():
                    found[key] = "link:" + os.readlink(path)
                elif path.is_dir():
                    found[key] = "dir"
                else:
                    found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def microtune_file(name: str) -> bool:
    return name in RUN_FILES or name == LOCK or name.endswith(".tmp")


# -- running one case ---------------------------------------------------------------------------

SIGINT_SCRIPT = (
    "import sys; print('up', flush=True); sys.argv = ['microtune', *sys.argv[1:]]; "
    "from microtune.__main__ import entry; sys.exit(entry())"
)
HOLD_SCRIPT = (
    "import sys, time; from filelock import FileLock; FileLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(120)"
)
STALL_SCRIPT = """
import sys, time, torch
real, calls = torch.optim.AdamW.step, [0]
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # step 2's checkpoint is on disk: stall until killed
        print("stalled", flush=True)
        time.sleep(120)
    return real(self, *args, **kwargs)
torch.optim.AdamW.step = step
from microtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


def run_sigint(ws: Workspace, argv: list[str]) -> tuple[int, str]:
    """Ctrl-C while the command imports torch: exactly what the `microtune` script runs."""
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, *argv],
        cwd=ws.root / "cwd",
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "up"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    return child.returncode, err


def run_in_process(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capfd.readouterr().err


def run_case(case: Case, ws: Workspace, capfd, monkeypatch) -> None:
    """Prepare, snapshot, run, and assert the three outcomes."""
    for name in ("artifact", "data", "cwd", "tmp"):
        (ws.root / name).mkdir(exist_ok=True)
    if case.prepare:
        case.prepare(ws)
    monkeypatch.chdir(ws.root / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(ws.root / "tmp"))
    if case.patch:
        PATCHES[case.patch](monkeypatch)
    holder = None
    if case.hold_lock:
        lock = ws.root / case.hold_lock
        lock.parent.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_SCRIPT, str(lock)], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout.readline().strip() == "held"
    before = snapshot(ws.root, ws.base)
    argv = ws.format(case.argv)
    try:
        if case.how == "sigint":
            code, err = run_sigint(ws, argv)
        else:
            code, err = run_in_process(argv, capfd)
    finally:
        if holder:
            holder.kill()
            holder.wait()
    after = snapshot(ws.root, ws.base)

    # 1. the exit code, 2. one line on stderr
    lines = err.strip().splitlines()
    assert code == case.code, (code, err[-2000:])
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("microtune: error:"), err[-2000:]
        assert case.expect in lines[0], lines[0]
    elif case.code == 130:
        assert len(lines) == 1 and lines[0].startswith("microtune: interrupted"), err[-2000:]
    else:
        assert "error" not in err and "Traceback" not in err, err[-2000:]
    # 3. the user's files: unchanged, and nothing new outside the --output of a success
    if case.code != 0:
        assert after == before
        return
    output = str(ws.root / case.output)
    for path, digest in before.items():
        inside = path.startswith(output + os.sep)
        if not (inside and microtune_file(Path(path).name)):
            assert after.get(path) == digest, path
    new = sorted(set(after) - set(before))
    assert all(path.startswith(output + os.sep) or path == output for path in new), new
    assert not any(Path(path).name == LOCK for path in after if path not in before), "lock left"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_dirs, toy_files) -> dict[str, Path]:
    """The module's runs, copied into each case that needs them: a base model of its own, the
    toy data laid out as a --data-dir, a trained artifact, a run interrupted by Ctrl-C after
    its checkpoint, and a run killed with -9 after its checkpoint."""
    root = tmp_path_factory.mktemp("hostile-sources")
    base = Path(shutil.copytree(tiny_model_dirs["bert"], root / "base"))
    data = root / "data" / "glue" / "sst2"
    data.mkdir(parents=True)
    shutil.copy(toy_files / "train.jsonl", data / "train.jsonl")
    shutil.copy(toy_files / "dev.jsonl", data / "validation.jsonl")
    (root / "data" / "inputs.txt").write_text("the film is good\nawful , dull plot\n")
    ws = Workspace(root, base)
    found = {"base": base, "data": root / "data"}

    argv = ws.format(train())
    argv[argv.index("--output") + 1] = str(root / "artifact")
    assert cli.main(argv) == 0
    found["artifact"] = root / "artifact"

    # Ctrl-C at the third optimizer step, after the checkpoint of step 2.
    argv = ws.format(train("--max-steps 4 --checkpoint-every 2"))
    argv[argv.index("--output") + 1] = str(root / "interrupted")
    real_step, calls = torch.optim.AdamW.step, [0]

    def interrupt_at_third(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", interrupt_at_third)
        assert cli.main(argv) == 130
    found["interrupted"] = root / "interrupted"

    # kill -9 in the third optimizer step, after the checkpoint of step 2 (a real process).
    killed = root / "killed"
    argv = ws.format(train("--max-steps 4 --checkpoint-every 1"))
    argv[argv.index("--output") + 1] = str(killed)
    child = subprocess.Popen(
        [sys.executable, "-c", STALL_SCRIPT, *argv],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "stalled"
    finally:
        child.kill()
        child.wait()
    assert (killed / CHECKPOINT).is_file() and (killed / LOCK).is_file()
    found["killed"] = killed
    return found


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.defect)] if case.defect else []
    return pytest.param(case, id=f"{case.kind}: {case.name}", marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile_case(case: Case, sources, tmp_path, capfd, monkeypatch):
    ws = Workspace(tmp_path / "ws", sources["base"], sources)
    ws.root.mkdir()
    shutil.copytree(sources["artifact"], ws.art)
    shutil.copytree(sources["data"], ws.root / "data")
    run_case(case, ws, capfd, monkeypatch)
    assert os.listdir(tmp_path) == ["ws"]  # nothing beside the workspace
    assert os.listdir(ws.root / "cwd") == [] and os.listdir(ws.root / "tmp") == []
