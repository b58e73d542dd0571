"""Hostile and careless input (issues 12, 23 and 32): one table of cases, one uniform assertion.

Every case runs the real command line (`microtune.cli.main` in process; a subprocess where a
signal is the point, or where a regression could hang in C code or eat the machine's memory:
the accountant), each under a time bound (`CASE_SECONDS`), so that a hang fails its case
instead of stalling the suite, in a fresh workspace holding a copy of a tiny artifact, the toy
data, an output folder, and the current and temporary folders. Each case asserts the same
three outcomes:

1. the exit code: 2 for a refusal, 130 for Ctrl-C, 0 for what must succeed;
2. stderr: for a refusal exactly one line starting with "microtune: error:" (so no traceback
   and no "internal error"), for Ctrl-C one line starting with "microtune: interrupted", for a
   success no error at all; the status line `eval` and `predict` show while they load
   ("microtune: loading base model …") may come first;
3. the files: every file of the workspace and of the base model's folder is byte-identical
   afterwards and nothing new exists anywhere, except what a success writes into the --output
   it was given (where only microtune's own files may change) and the log a stopped run keeps.

The cases are data (`CASES`, counted by kind by `bench/hostile_campaign.py`); a case the code
does not pass yet is listed in `KNOWN_DEFECTS` (a strict xfail). What the helper test files
check in detail (message wording, internals) is not repeated here.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
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
from microtune.artifacts.store import config_sha256
from microtune.common.manifest import seal_record
from tests.conftest import error_lines
from tests.test_causal_lm import make_causal_model

REPO = Path(__file__).resolve().parents[1]
LOCK = ".microtune.lock"
CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"
RUN_FILES = ("adapter.safetensors", "microtune.json", "metrics.json", LOG, CHECKPOINT)

KINDS = {
    "artifact-json": "artifact microtune.json field corruptions",
    "artifact-tensor": "artifact tensor-file corruptions",
    "data-file": "data-file corruptions",
    "output-folder": "output-folder hazards",
    "concurrent": "concurrent runs, Ctrl-C and kill -9",
    "numerics": "the numerics guard",
    "options": "bad option values",
    "privacy": "DP options and the accountant (issue 23)",
    "model-folder": "base model folders: pickles, a config that disagrees with the weights",
    "input": "predict and generate input: standard input, empty prompts",
    "serve": "microtune serve misuse: artifacts, artifact root, port, option values",
    "federate": "microtune federate misuse: clients, rounds, alpha, method, task",
    "http": "the server's malformed and oversized requests (HTTP_CASES, one live server)",
    "export": "export folders: tampered files and records, --overwrite beside the user's files",
}
# A launcher run whose rank dies (torchrun, SIGKILL of rank 1) is tests/test_distributed.py's
# test_a_killed_rank_stops_the_other_and_the_run_resumes_bit_for_bit: it asserts the one line;
# torchrun itself killed (its process group, -9) is its test_workers_die_with_a_killed_launcher...
# Every case's time bound: a hang fails its case instead of stalling the suite (in process by
# SIGALRM; a subprocess is killed).
CASE_SECONDS = 120

Prepare = Callable[["Workspace"], None]


@dataclass(frozen=True)
class Case:
    """One hostile input and what must come of it.

    Attributes:
        kind: the family of the case (a key of KINDS).
        name: what the case does, as a short phrase (the test id is "kind: name").
        argv: the command line, split on spaces; {art}, {data}, {out}, {base}, {ws} are the
            workspace's folders, {empty} an empty argument and {blank} one of spaces.
        prepare: damages or sets up the workspace before the command runs.
        code: the exit code the command must give.
        expect: text the one error line must hold.
        output: the folder (relative to the workspace) a success may write.
        leaves: paths (relative) a failed run may leave: the log of a diverged run.
        hold_lock: a lock file (relative) that another process holds while the command runs.
        patch: a failure injected in process (a key of PATCHES).
        how: "cli" (in process), "subprocess" (`python -m microtune` in a subprocess under a
            memory limit: where a regression would hang in C code or eat the machine's memory)
            or "sigint:<module>" (a subprocess given Ctrl-C when its start-up first imports
            that module).
        stdin: bytes on the command's standard input.
    """

    kind: str
    name: str
    argv: str
    prepare: Prepare | None = None
    code: int = 2
    expect: str = ""
    output: str = "out"
    leaves: tuple[str, ...] = ()
    hold_lock: str | None = None
    patch: str | None = None
    how: str = "cli"
    stdin: bytes | None = None

    @property
    def id(self) -> str:
        return f"{self.kind}: {self.name}"


# -- command lines ------------------------------------------------------------------------------

TRAIN = (
    "train --task {task} --method {method} --model {{base}} --data-dir {{data}} --batch-size 8 "
    "--eval-every 0 --no-progress --output {{out}}"
)


def train(extra: str = "", *, task: str = "sst2", method: str = "slash", steps: int = 2) -> str:
    line = TRAIN.format(task=task, method=method) + (" --d 8" if method == "slash" else "")
    return line + (f" --max-steps {steps}" if steps else "") + (f" {extra}" if extra else "")


ARTIFACT_COMMANDS = {
    "info": "info --artifact {art}",
    "eval": "eval --artifact {art} --data-dir {data}",
    "predict": "predict --artifact {art} --input {data}/inputs.txt",
    "merge": "merge --artifact {art} --output {out}",
    "export": "export --artifact {art} --output {out} --data-dir {data} --check-examples 8",
}
MERGE = "merge --artifact {art} --output"
EXPORT = "export --artifact {art} --data-dir {data} --check-examples 8 --output"


def each_artifact_command(index: int) -> tuple[str, str]:
    """The artifact commands in turn, so that every check is reached through each of them."""
    name = list(ARTIFACT_COMMANDS)[index % len(ARTIFACT_COMMANDS)]
    return name, ARTIFACT_COMMANDS[name]


# -- workspace edits (the `prepare` functions) --------------------------------------------------


def edit_config(path: str, value=None, *, delete: bool = False, forge: bool = False) -> Prepare:
    """Set (or delete) a dotted key of the artifact's microtune.json; "" is the whole file.

    `forge`: also recompute the config's content hash, as a careful forger would, so that the
    checks behind it (sizes, fingerprints, the position table) are what the case tests."""

    def prepare(ws: Workspace) -> None:
        file = ws.art / "microtune.json"
        config = json.loads(file.read_text())
        if not path:
            config = value
        else:
            *parents, key = path.split(".")
            parent = config
            for name in parents:
                parent = parent[name]
            if delete:
                del parent[key]
            else:
                parent[key] = value
            if forge:
                config["config_sha256"] = config_sha256(config)
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
    config["config_sha256"] = config_sha256(config)
    file.write_text(json.dumps(config))


def edit_tensors(change: Callable[[dict], dict]) -> Prepare:
    def prepare(ws: Workspace) -> None:
        file = ws.art / "adapter.safetensors"
        save_file(change(load_file(file)), file)
        rehash(ws)

    return prepare


def tensor_bytes(damage: Callable[[bytes], bytes], *, fix_hash: bool = True) -> Prepare:
    def prepare(ws: Workspace) -> None:
        file = ws.art / "adapter.safetensors"
        file.write_bytes(damage(file.read_bytes()))
        if fix_hash:
            rehash(ws)

    return prepare


def tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor | None]) -> Prepare:
    """Replace (None: drop) one stored tensor, keeping the hash in step."""

    def change(tensors: dict) -> dict:
        value = make(tensors.pop(name))
        return tensors if value is None else {**tensors, name: value}

    return edit_tensors(change)


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
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return prepare


def link(relative: str, target: Callable[[Workspace], Path]) -> Prepare:
    def prepare(ws: Workspace) -> None:
        path = ws.root / relative
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target(ws))

    return prepare


def both(*steps: Prepare) -> Prepare:
    def prepare(ws: Workspace) -> None:
        for step in steps:
            step(ws)

    return prepare


def copy_in(source: str, relative: str = "out") -> Prepare:
    """Copy one of the module's runs (artifact, interrupted, killed) into the workspace."""

    def prepare(ws: Workspace) -> None:
        shutil.copytree(ws.sources[source], ws.root / relative)

    return prepare


def rows(*items) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def sealed_export(relative: str = "out") -> Prepare:
    """An earlier export's record in the folder, listing the files it holds (as an export
    writes it: only then may --overwrite replace the folder)."""

    def prepare(ws: Workspace) -> None:
        record = seal_record({"format": "sentence-transformers"}, ws.root / relative)
        (ws.root / relative / "microtune_export.json").write_text(json.dumps(record))

    return prepare


def user_folder(relative: str = "out") -> Prepare:
    """The user's own files, one of them named like microtune's metrics."""
    return both(
        write(f"{relative}/notes.txt", "my notes\n"),
        write(f"{relative}/metrics.json", '{"mine": 1}\n'),
    )


def disk_full_in_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up after the merged model's first file is written."""
    from transformers import PreTrainedModel

    def disk_full(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)


def disk_full_in_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up inside safetensors, which reports it as its own error (what a real
    full tmpfs gives), for the merged model and for microtune's own tensor files."""
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 8)
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)


PATCHES = {"disk full": disk_full_in_save, "disk full in safetensors": disk_full_in_safetensors}

# -- (a) microtune.json: missing keys, wrong types, sizes, paths, hand edits --------------------

_JSON_EDITS: list[tuple[str, Prepare, str]] = [
    ("method deleted", edit_config("method", delete=True), "method"),
    ("tensors_sha256 deleted", edit_config("tensors_sha256", delete=True), "tensors_sha256"),
    ("head deleted", edit_config("head", delete=True), "head"),
    ("fingerprint deleted", edit_config("base_model.fingerprint", delete=True), "fingerprint"),
    ("d as a string", edit_config("method_config.d", "8"), "method_config.d"),
    ("d as a bool", edit_config("method_config.d", True), "method_config.d"),
    ("d = 10^12", edit_config("method_config.d", 10**12), "method_config"),
    ("d = 0", edit_config("method_config.d", 0), "method_config"),
    (
        "num_labels = 10^9",
        both(edit_config("head.num_labels", 10**9), edit_config("task.num_labels", 10**9)),
        "num_labels",
    ),
    ("head and task num_labels differ", edit_config("task.num_labels", 3), "labels"),
    ("max_length 0", edit_config("max_length", 0), "max_length"),
    ("max_length 10^9", edit_config("max_length", 10**9), "max_length"),
    (
        "max_length past the position table",
        edit_config("max_length", 1000, forge=True),
        "max_length",
    ),
    ("task.name with ../", edit_config("task.name", "../../outside"), "task.name"),
    ("task.dev_split with ../", edit_config("task.dev_split", "../outside"), "dev_split"),
    ("task.dev_split absolute", edit_config("task.dev_split", "/etc/passwd"), "dev_split"),
    ("read-out unknown", edit_config("head.readout", "sideways"), "readout"),
    ("method unknown", edit_config("method", "magic"), "method"),
    ("format_version 99", edit_config("format_version", 99), "format version"),
    ("format not microtune's", edit_config("format", "other"), "format"),
    ("std scale NaN", edit_config("method_config.projection_std_scale", math.nan), "scale"),
    ("std scale inf", edit_config("method_config.projection_std_scale", math.inf), "scale"),
    ("head_dropout 1.5", edit_config("head.head_dropout", 1.5), "head_dropout"),
    ("projection_seed -1", edit_config("method_config.projection_seed", -1), "seed"),
    ("projection_seed 2^70", edit_config("method_config.projection_seed", 2**70), "seed"),
    ("an unknown key", edit_config("surprise", 1), "surprise"),
    ("an unknown method option", edit_config("method_config.rank", 4), "rank"),
    ("method_state on slash", edit_config("method_state", {"k": 1}), "method_state"),
    ("parameters.total wrong", edit_config("parameters.trained.total", 1), "total"),
    ("base dtype unknown", edit_config("base_model.dtype", "float8"), "dtype"),
    ("3 label_names", edit_config("task.label_names", ["a", "b", "c"]), "label_names"),
    (
        "another base",
        edit_config("base_model.fingerprint", "sha256:" + "0" * 64, forge=True),
        "mismatch",
    ),
    (
        "base model missing",
        edit_config("base_model.name", "/nonexistent/model", forge=True),
        "nonexistent",
    ),
    ("a JSON array", edit_config("", [1, 2]), "not a JSON object"),
    ("truncated", config_bytes(lambda b: b[: len(b) // 2]), "not valid JSON"),
    ("empty", config_bytes(lambda b: b""), "not valid JSON"),
    ("not UTF-8", config_bytes(lambda b: b"\xff\xfe" + b), "microtune.json"),
    ("deleted", remove("artifact/microtune.json"), "not a microtune artifact"),
]
# Valid values the artifact was not trained with: predictions change silently unless the
# config itself is covered by a hash.
_JSON_VALID_EDITS: list[tuple[str, Prepare]] = [
    ("projection_seed changed to 1", edit_config("method_config.projection_seed", 1)),
    ("label_names swapped", edit_config("task.label_names", ["positive", "negative"])),
]

# -- (b) the tensor file: bytes, dtypes, shapes, names, values ----------------------------------

Z, W, B = "method.z", "head.linear.weight", "head.linear.bias"
_TENSOR_EDITS: list[tuple[str, Prepare, str]] = [
    (
        "a byte changed, hash kept",
        tensor_bytes(lambda b: b[:-1] + b"\x00", fix_hash=False),
        "match",
    ),
    ("deleted", remove("artifact/adapter.safetensors"), "missing"),
    ("z as int64", tensor(Z, lambda t: t.to(torch.int64)), Z),
    ("z as bool", tensor(Z, lambda t: t > 0), Z),
    ("z as float16", tensor(Z, lambda t: t.half()), Z),
    ("z as float64", tensor(Z, lambda t: t.double()), Z),
    ("z one longer", tensor(Z, lambda t: torch.cat([t, t[:1]])), Z),
    ("z a scalar", tensor(Z, lambda t: t[0].clone()), Z),
    ("z empty", tensor(Z, lambda t: t[:0].clone()), Z),
    ("head weight transposed", tensor(W, lambda t: t.t().contiguous()), W),
    ("head bias missing", tensor(B, lambda t: None), B),
    ("z missing", tensor(Z, lambda t: None), Z),
    ("an extra tensor", edit_tensors(lambda d: {**d, "method.x": torch.zeros(3)}), "method.x"),
    ("z NaN", tensor(Z, lambda t: torch.full_like(t, math.nan)), "NaN"),
    ("head weight inf", tensor(W, lambda t: torch.full_like(t, math.inf)), "NaN"),
    ("truncated", tensor_bytes(lambda b: b[: len(b) // 2]), "safetensors"),
    ("empty", tensor_bytes(lambda b: b""), "safetensors"),
    ("random bytes", tensor_bytes(lambda b: os.urandom(len(b))), "safetensors"),
    ("header of 2^60 bytes", tensor_bytes(lambda b: (1 << 60).to_bytes(8, "little") + b[8:]), ""),
    ("header not JSON", tensor_bytes(lambda b: b[:8] + b"\xff" * 8 + b[16:]), "safetensors"),
]


def _artifact_cases() -> list[Case]:
    cases = []
    for kind, edits in (("artifact-json", _JSON_EDITS), ("artifact-tensor", _TENSOR_EDITS)):
        for index, (name, prepare, expect) in enumerate(edits):
            command, argv = each_artifact_command(index)
            cases.append(Case(kind, f"{command}: {name}", argv, prepare, expect=expect))
    for name, prepare in _JSON_VALID_EDITS:  # predict shows the labels, eval the metric
        for command in ("predict", "eval"):
            argv = ARTIFACT_COMMANDS[command]
            cases.append(Case("artifact-json", f"{command}: {name}", argv, prepare))
    return cases


# -- (c) data files: encodings, shapes, labels, links out of the data folder --------------------

SST2 = "data/glue/sst2/"
STSB_DEV = rows(*[{"sentence1": "a film", "sentence2": "the movie", "label": 2.5}] * 8)
USER_FILE = "eval --artifact {art} --data-file {data}/user.jsonl"
USER_INPUT = "predict --artifact {art} --input {data}/user.txt"


def sst2_train(text: str | bytes, name: str = "train.jsonl") -> Prepare:
    return both(remove(SST2 + "train.jsonl"), write(SST2 + name, text))


def sst2_row(**row) -> Prepare:
    return sst2_train(rows(row))


def stsb_train(label: str) -> Prepare:
    """STS-B training rows, the last with `label` as written in the JSON line."""
    good = json.dumps({"sentence1": "a film", "sentence2": "the movie", "label": 1.0})
    bad = f'{{"sentence1": "a film", "sentence2": "bad", "label": {label}}}'
    return both(
        write("data/glue/stsb/train.jsonl", "\n".join([good] * 7 + [bad]) + "\n"),
        write("data/glue/stsb/validation.jsonl", STSB_DEV),
    )


def flip_labels(ws: Workspace) -> None:
    """The same number of training rows, every label flipped."""
    file = ws.root / SST2 / "train.jsonl"
    lines = file.read_text().splitlines()
    file.write_text(rows(*({**row, "label": 1 - row["label"]} for row in map(json.loads, lines))))


def outside_link(ws: Workspace) -> Path:
    return ws.root / "outside" / "secret.jsonl"


_DATA_CASES: list[tuple[str, str, Prepare | None, str]] = [
    ("train: not UTF-8", train(), sst2_train(b'{"sentence": "caf\xe9", "label": 1}\n'), "UTF-8"),
    (
        "train: JSON array, a non-object",
        train(),
        sst2_train('[{"sentence": "a"}, 5]', "train.json"),
        "",
    ),
    ("train: JSON array holding a number", train(), sst2_train("[5]", "train.json"), ""),
    ("train: a truncated JSON line", train(), sst2_train('{"sentence": "a film", "lab\n'), ""),
    ("train: an empty file", train(), sst2_train(""), ""),
    ("train: a line that is an array", train(), sst2_train("[1, 2]\n"), ""),
    ("train: no label column", train(), sst2_row(sentence="a film"), "label"),
    ("train: no text column", train(), sst2_row(text="a film", label=1), "sentence"),
    ("train: label 5 of 2 classes", train(), sst2_row(sentence="a", label=5), ""),
    ("train: label 1.5", train(), sst2_row(sentence="a", label=1.5), ""),
    ("train: label -1", train(), sst2_row(sentence="a", label=-1), ""),
    ("train: label null", train(), sst2_row(sentence="a", label=None), "label"),
    ("train: label true", train(), sst2_row(sentence="a", label=True), "label"),
    ("train: text null", train(), sst2_row(sentence=None, label=1), ""),
    ("train: text an object", train(), sst2_row(sentence={"a": 1}, label=1), ""),
    ("train: the file is a folder", train(), sst2_train("", "train.jsonl/x"), ""),
    ("train: no dev split", train(), remove(SST2 + "validation.jsonl"), "validation"),
    (
        "train: a link out of --data-dir",
        train(),
        both(
            write("outside/secret.jsonl", rows({"sentence": "a", "label": 1})),
            link(SST2 + "train.jsonl", outside_link),
        ),
        "outside --data-dir",
    ),
    ("train: CSV without labels", train(), sst2_train("sentence\na film\n", "train.csv"), "label"),
    ("train: ragged TSV", train(), sst2_train("sentence\tlabel\na\t1\tb\nc\n", "train.tsv"), ""),
    ("train: CSV label text", train(), sst2_train("sentence,label\na,yes\n", "train.csv"), ""),
    ("eval: --data-file missing", USER_FILE, None, "user.jsonl"),
    ("eval: --data-file not UTF-8", USER_FILE, write("data/user.jsonl", b"\xff\xfe\x00"), ""),
    ("eval: --data-file a folder", USER_FILE, write("data/user.jsonl/x", ""), ""),
    ("predict: --input not UTF-8", USER_INPUT, write("data/user.txt", b"caf\xe9\n"), ""),
    ("predict: --input missing", USER_INPUT, None, "user.txt"),
    ("predict: JSON without the column", USER_INPUT, write("data/user.txt", '{"x": "a"}\n'), ""),
    (
        "train: --train-file without --dev-file",
        train().replace("--data-dir {data}", "--train-file {data}/glue/sst2/train.jsonl"),
        None,
        "together",
    ),
]

# -- (d) output folders -------------------------------------------------------------------------

A_FILE = write("file.txt", "mine\n")


def folder_case(name: str, argv: str, prepare: Prepare | None = None, **kw) -> Case:
    return Case("output-folder", name, argv, prepare, **kw)


_FOLDER_CASES: list[Case] = [
    folder_case("train --output ''", train("--output {empty}"), expect="empty"),
    folder_case("train --output '   '", train("--output {blank}"), expect="empty"),
    folder_case("merge --output ''", f"{MERGE} {{empty}}", expect="empty"),
    folder_case("export --output ''", f"{EXPORT} {{empty}}", expect="empty"),
    folder_case("train --output a file", train("--output {ws}/file.txt"), A_FILE, expect="a file"),
    folder_case("train under a file", train("--output {ws}/file.txt/r"), A_FILE, expect="a file"),
    folder_case("merge under a file", f"{MERGE} {{ws}}/file.txt/m", A_FILE, expect="a file"),
    folder_case("export --output a file", f"{EXPORT} {{ws}}/file.txt", A_FILE, expect="a file"),
    folder_case("train into the user's files", train(), user_folder(), expect="did not write"),
    folder_case(
        "train --resume, user's files", train("--resume"), user_folder(), expect="not write"
    ),
    folder_case(
        "train --overwrite beside user's files", train("--overwrite"), user_folder(), code=0
    ),
    folder_case(
        "train over an artifact", train("--seed 1"), copy_in("artifact"), expect="finished"
    ),
    folder_case(
        "train --resume, an artifact", train("--resume"), copy_in("artifact"), expect="fin"
    ),
    folder_case("train --overwrite an artifact", train("--overwrite"), copy_in("artifact"), code=0),
    folder_case(
        "train over a checkpoint",
        train("--checkpoint-every 2", steps=4),
        copy_in("interrupted"),
        expect="--resume",
    ),
    folder_case(
        "train --resume --overwrite",
        train("--checkpoint-every 2 --resume --overwrite", steps=4),
        copy_in("interrupted"),
        expect="only one",
    ),
    folder_case("train --output the base", train("--output {base}"), expect="base model"),
    folder_case(
        "train --output a link to the base",
        train("--output {ws}/link"),
        link("link", lambda ws: ws.base),
        expect="base model",
    ),
    folder_case("merge --output the base", f"{MERGE} {{base}}", expect="base model"),
    folder_case("merge --overwrite the base", f"{MERGE} {{base}} --overwrite", expect="base model"),
    folder_case("export --overwrite the base", f"{EXPORT} {{base}} --overwrite", expect="base"),
    folder_case(
        "merge --output a link to the base",
        f"{MERGE} {{ws}}/link --overwrite",
        link("link", lambda ws: ws.base),
        expect="base model",
    ),
    folder_case(
        "merge --output the base's parent", f"{MERGE} {{base}}/.. --overwrite", expect="base"
    ),
    folder_case("merge --output the artifact", f"{MERGE} {{art}} --overwrite", expect="artifact"),
    folder_case(
        "merge --output the artifact's parent", f"{MERGE} {{ws}} --overwrite", expect="art"
    ),
    folder_case(
        "merge into a model", f"{MERGE} {{out}}", write("out/config.json", "{}"), expect="model"
    ),
    folder_case(
        "merge into safetensors",
        f"{MERGE} {{out}}",
        write("out/model.safetensors", b"weights"),
        expect="holds a model",
    ),
    folder_case(
        "merge into the user's files", f"{MERGE} {{out}}", user_folder(), expect="not empty"
    ),
    folder_case(
        "merge with a full disk",
        f"{MERGE} {{out}}/merged",
        write("out/keep.txt", "mine\n"),
        expect="No space left",
        patch="disk full",
    ),
    folder_case(
        "merge --overwrite a model, full disk",
        f"{MERGE} {{out}} --overwrite",
        both(write("out/model.safetensors", b"old weights"), sealed_export("out")),
        expect="No space left",
        patch="disk full",
    ),
    folder_case(
        "merge, a full disk in safetensors",
        f"{MERGE} {{out}}/merged",
        expect="No space left",
        patch="disk full in safetensors",
    ),
    folder_case(
        "train, a full disk in safetensors",
        train("--checkpoint-every 1"),
        expect="No space left",
        patch="disk full in safetensors",
    ),
    folder_case("merge into a new folder", f"{MERGE} {{out}}/merged", code=0),
    folder_case("export into a new folder", f"{EXPORT} {{out}}/merged", code=0),
    folder_case(
        "train after a kill left .tmp files",
        train(),
        write("out/.adapter.safetensors.k2j_x9aa.tmp", b""),
        code=0,
    ),
]

# -- (e) another process holds the folder; Ctrl-C; kill -9 then a restart ------------------------

HELD = "out/" + LOCK
# Modules the start-up imports, where a Ctrl-C lands in different hands (torch's C code imports
# numpy and clears the error of a failed import).
STARTUP_IMPORTS = ("torch", "numpy", "numpy.linalg", "transformers")


def concurrent_case(name: str, argv: str, prepare: Prepare | None = None, **kw) -> Case:
    return Case("concurrent", name, argv, prepare, **kw)


_CONCURRENT_CASES: list[Case] = [
    concurrent_case("train on a held folder", train(), expect="in use", hold_lock=HELD),
    concurrent_case(
        "train --overwrite, held", train("--overwrite"), expect="in use", hold_lock=HELD
    ),
    concurrent_case(
        "train --resume on a held run",
        train("--checkpoint-every 2 --resume", steps=4),
        copy_in("interrupted"),
        expect="in use",
        hold_lock=HELD,
    ),
    concurrent_case(
        "merge into a held training folder",
        f"{MERGE} {{out}} --overwrite",
        expect="in use",
        hold_lock=HELD,
    ),
    concurrent_case(
        "merge beside another export",
        f"{MERGE} {{out}}/merged",
        expect="in use",
        hold_lock="out/.merged" + LOCK,
    ),
    concurrent_case("train beside a stale lock", train(), write(HELD, "999999999\n"), code=0),
    *(
        concurrent_case(
            f"Ctrl-C while importing {module}", "info", code=130, how=f"sigint:{module}"
        )
        for module in STARTUP_IMPORTS
    ),
    concurrent_case(
        "kill -9, restart without --resume",
        train("--checkpoint-every 1", steps=4),
        copy_in("killed"),
        expect="--resume",
    ),
    concurrent_case(
        "kill -9, restart with --resume",
        train("--checkpoint-every 1 --resume", steps=4),
        copy_in("killed"),
        code=0,
    ),
    concurrent_case(
        "Ctrl-C mid-run, then --resume",
        train("--checkpoint-every 2 --resume", steps=4),
        copy_in("interrupted"),
        code=0,
    ),
]

# -- (f) the numerics guard ---------------------------------------------------------------------

DIVERGED_LEAVES = ("out", "out/" + LOG)  # the run's log, with the line naming the step


def numerics_case(name: str, argv: str, prepare: Prepare | None = None, **kw) -> Case:
    return Case("numerics", name, argv, prepare, **kw)


_NUMERICS_CASES: list[Case] = [
    numerics_case(
        "full --lr 1e6",
        train("--lr 1e6", method="full", steps=6),
        expect="diverged",
        leaves=DIVERGED_LEAVES,
    ),
    numerics_case(
        "slash --projection-std-scale 1e30",
        train("--projection-std-scale 1e30"),
        expect="diverged",
        leaves=DIVERGED_LEAVES,
    ),
    numerics_case("--lr inf", train("--lr inf"), expect="--lr"),
    numerics_case("--lr nan", train("--lr nan"), expect="--lr"),
    numerics_case("--lr 1e30", train("--lr 1e30"), expect="--lr"),
    numerics_case(
        "--projection-std-scale inf", train("--projection-std-scale inf"), expect="scale"
    ),
    numerics_case(
        "--projection-std-scale nan", train("--projection-std-scale nan"), expect="scale"
    ),
    numerics_case("--head-dropout nan", train("--head-dropout nan"), expect="dropout"),
    numerics_case("--warmup-ratio nan", train("--warmup-ratio nan"), expect="warmup"),
    *(
        numerics_case(f"stsb label {label}", train(task="stsb"), stsb_train(label), expect="finite")
        for label in ("NaN", '"nan"', "Infinity", '"-inf"', '"1e999"')
    ),
]

# -- (g) option values --------------------------------------------------------------------------

_OPTION_VALUES: list[tuple[str, str]] = [
    ("--epochs inf", "--epochs"),
    ("--epochs nan", "--epochs"),
    ("--epochs 0", "--epochs"),
    ("--epochs -1", "--epochs"),
    ("--weight-decay -1", "--weight-decay"),
    ("--weight-decay inf", "--weight-decay"),
    (f"--seed {2**70}", "--seed"),
    ("--seed -1", "--seed"),
    ("--grad-accum 1000", "--grad-accum"),
    ("--grad-accum 0", "--grad-accum"),
    ("--batch-size 0", "--batch-size"),
    ("--batch-size -3", "--batch-size"),
    ("--max-length 0", "--max-length"),
    ("--max-length 1000000", "--max-length"),
    ("--max-steps 0", "--max-steps"),
    ("--warmup-ratio 1", "--warmup-ratio"),
    ("--lr 0", "--lr"),
    ("--lr -1", "--lr"),
    ("--d 0", "d"),
    ("--d -5", "d"),
    (f"--d {10**12}", "d"),
    ("--projection-seed -1", "seed"),
    ("--max-train-examples 0", "--max-train-examples"),
    ("--eval-every -1", "--eval-every"),
    ("--checkpoint-every -1", "--checkpoint-every"),
    ("--head-dropout 1", "dropout"),
    ("--device banana", "device"),
    ("--device cuda:7", "GPU"),
    ("--dp-epsilon -1", "epsilon"),
    ("--dp-epsilon inf", "epsilon"),
    ("--dp-epsilon 8 --dp-delta 2", "delta"),
    ("--seed abc", "--seed"),
    ("--readout sideways", "--readout"),
    ("--max-steps 1.5", "--max-steps"),
]


def _option_cases() -> list[Case]:
    cases = [
        Case("options", extra, train(extra, steps=0 if "--epochs" in extra else 2), expect=expect)
        for extra, expect in _OPTION_VALUES
    ]
    for name, argv, expect in (
        ("predict --batch-size 0", ARTIFACT_COMMANDS["predict"] + " --batch-size 0", "batch"),
        ("eval --split ../x", ARTIFACT_COMMANDS["eval"] + " --split ../x", "split"),
        ("eval --task cola on sst2", ARTIFACT_COMMANDS["eval"] + " --task cola", "cola"),
        ("export --check-examples 0", f"{EXPORT} {{out}}/m --check-examples 0", "examples"),
        ("export --check-examples -1", f"{EXPORT} {{out}}/m --check-examples -1", "examples"),
    ):
        cases.append(Case("options", name, argv, expect=expect))
    return cases


# -- (g) issue 23: the surfaces added since (DP, accountant, own data, causal LM, model folders,
# predict/generate input, the bench) ---------------------------------------------------------

ACCOUNTANT = "accountant --sample-rate 0.01 --delta 1e-5"
DP = "--dp-batch 16 --dp-noise-seed 0"
USER_TRAIN = (
    "train --task classification --method slash --d 8 --model {base} --train-file {ws}/t.csv "
    "--dev-file {ws}/t.csv --text-columns text --label-column category --max-steps 2 "
    "--eval-every 0 --no-progress --output {out}"
)
CAUSAL_TRAIN = (
    "train --task causal-lm --method slash --d 8 --model {gpt2} --train-file {ws}/long.jsonl "
    "--dev-file {ws}/long.jsonl --max-length 8 --max-steps 2 --eval-every 0 --no-progress "
    "--output {out}"
)
LONG_PROMPTS = rows(*[{"prompt": "the film is " * 6, "response": "good"}] * 4)
BENCH = 'tasks = ["sst2"]\nseeds = [0]\n[[methods]]\nmethod = "slash"\n'
BINARY = b"\xff\xfe\x00caf\xe9 \x80\n"
CAUSAL = ("causal",)  # its base is the module's tiny GPT-2, named by absolute path


def user_csv(text: str) -> Prepare:
    return write("t.csv", text)


def copies(*names: str) -> Prepare:
    """Copies of the module's runs or models, each into the workspace folder of its name."""
    return both(*(copy_in(name, name) for name in names))


def model_copy(relative: str, change: Callable[[Path], None]) -> Prepare:
    """A copy of the base model's folder, changed."""

    def prepare(ws: Workspace) -> None:
        change(Path(shutil.copytree(ws.base, ws.root / relative)))

    return prepare


def pickled_only(folder: Path) -> None:
    """The weights as a pickle (pytorch_model.bin) and no safetensors file."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def wider_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))


def _privacy_cases() -> list[Case]:
    cases = [
        Case("privacy", f"train {extra}", train(f"{extra} {DP}"), expect=expect)
        for extra, expect in (
            ("--dp-epsilon 1e300", "epsilon"),
            ("--dp-epsilon 8 --dp-delta 0.5", "delta"),
            ("--dp-epsilon 8 --dp-delta 0.02", "1/N"),  # 96 examples: δ must be below 1/96
            ("--dp-sigma 1e-6", "--dp-sigma"),
        )
    ]
    for extra, expect in (
        ("--sigma inf --steps 100", "sigma"),
        ("--epsilon 1e300 --steps 100", "epsilon"),
        ("--epsilon inf --steps 100", "epsilon"),
        ("--sigma 1e-6 --steps 100", "sigma"),
        ("--sigma 1 --steps 1000000000000", "steps"),
        ("--sigma 1 --epochs inf", "--epochs"),
        ("--sigma 1 --epochs 1e300", "--epochs"),
        ("--sigma 0.5 --steps 1000000", "grid"),  # PRV's grid would not fit in memory
        ("--sigma 1 --steps 100 --num-examples 10 --delta 0.2", "1/N"),
    ):
        argv = f"{ACCOUNTANT} {extra}"
        cases.append(Case("privacy", f"accountant {extra}", argv, expect=expect, how="subprocess"))
    return cases


def _model_folder_cases() -> list[Case]:
    pickled = model_copy("pickled", pickled_only)
    cases = [
        Case("model-folder", f"{command}: pickled weights only", argv, pickled, expect="pickled")
        for command, argv in (
            ("train", train().replace("--model {base}", "--model {ws}/pickled")),
            ("eval", ARTIFACT_COMMANDS["eval"] + " --model {ws}/pickled"),
            ("inspect", "inspect --model {ws}/pickled"),
        )
    ]
    wide = train().replace("--model {base}", "--model {ws}/wide")
    cases.append(
        Case(
            "model-folder",
            "train: config wider than the weights",
            wide,
            model_copy("wide", wider_config),
            expect="disagrees",
        )
    )
    return cases


_INPUT_CASES: list[Case] = [
    Case(
        "input",
        "predict: binary standard input",
        "predict --artifact {art}",
        stdin=BINARY,
        expect="UTF-8",
    ),
    Case(
        "input",
        "generate: binary standard input",
        "generate --artifact {causal}",
        copies(*CAUSAL),
        stdin=BINARY,
        expect="UTF-8",
    ),
    Case(
        "input",
        "generate --prompt ''",
        "generate --artifact {causal} --prompt {empty}",
        copies(*CAUSAL),
        expect="prompt",
    ),
]

_ROUND_TWO_DATA: list[tuple[str, str, Prepare | None, str]] = [
    ("train: stsb label 99", train(task="stsb"), stsb_train("99"), "range"),
    ("train: stsb label -7", train(task="stsb"), stsb_train("-7"), "range"),
    ("train: every text empty", USER_TRAIN, user_csv("text,category\n,a\n ,b\n,a\n,b\n"), "empty"),
    (
        "train: the CSV header repeated",
        USER_TRAIN,
        user_csv("text,category\ngood film,a\nbad film,b\ntext,category\nfun,a\n"),
        "header",
    ),
    (
        "train: two columns named category",
        USER_TRAIN,
        user_csv("text,category,category\ngood film,a,b\nbad film,b,a\n"),
        "more than once",
    ),
    (
        "train causal-lm: every prompt past --max-length",
        CAUSAL_TRAIN,
        both(write("long.jsonl", LONG_PROMPTS), copies("gpt2")),
        "no scored token",
    ),
    (
        "eval causal-lm: every dev prompt past max_length",
        "eval --artifact {causal} --data-file {ws}/long.jsonl",
        both(write("long.jsonl", LONG_PROMPTS), copies(*CAUSAL)),
        "no scored token",
    ),
    (
        "train --resume on changed rows, same count",
        train("--checkpoint-every 2 --resume", steps=4),
        both(copy_in("interrupted"), flip_labels),
        "train_data_sha256",
    ),
]

_BENCH_RUN = "bench run {ws}/one.toml --model {base} --data-dir {data}"


def _round_two_cases() -> list[Case]:
    cases = [*_privacy_cases(), *_model_folder_cases(), *_INPUT_CASES]
    cases += [Case("data-file", n, a, p, expect=e) for n, a, p, e in _ROUND_TWO_DATA]
    for name, path, value in (
        ("projection_seed edited", "method_config.projection_seed", 1),
        ("label_names swapped", "task.label_names", ["positive", "negative"]),
    ):
        edit = both(edit_config(path, value), edit_config("config_sha256", delete=True))
        for command in ("predict", "info"):
            name_ = f"{command}: {name}, config_sha256 deleted"
            argv = ARTIFACT_COMMANDS[command]
            cases.append(Case("artifact-json", name_, argv, edit, expect="config_sha256"))
    stsb = edit_config("task.name", "stsb", forge=True)
    cases += [
        Case(
            "artifact-json",
            "info: stsb with a two-label head",
            "info --artifact {art}",
            stsb,
            expect="labels",
        ),
        folder_case(
            "merge --output . --overwrite over the user's files",
            "merge --artifact {art} --output . --overwrite",
            write("cwd/notes.txt", "mine\n"),
            expect="did not write",
        ),
        folder_case(
            "export --overwrite over the user's files",
            f"{EXPORT} {{out}} --overwrite",
            user_folder(),
            expect="did not write",
        ),
        folder_case(
            "bench run --output holding the user's bench.json",
            f"{_BENCH_RUN} --output {{out}}",
            both(write("one.toml", BENCH), write("out/bench.json", '{"mine": 1}\n')),
            expect="not a bench folder",
        ),
        folder_case(
            "bench run, a name with ../",
            _BENCH_RUN,
            write("one.toml", 'name = "../escape"\n' + BENCH),
            expect="bench name",
        ),
    ]
    return cases


# -- (h) issue 23, item 5: what landed in round two (serve, federate, the server's requests) ------

SERVE = "serve --artifacts {art} --port 0"
FEDERATE = (
    "federate --task sst2 --method slash --d 8 --model {base} --data-dir {data} --max-length 16 "
    "--output {out} --no-progress --clients 4 --clients-per-round 2 --rounds 1 --local-steps 1"
)


def hold_port(ws: Workspace) -> None:
    """Another server listening on a loopback port ({port})."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    ws.held.append(sock)


_SERVE_CASES: list[tuple[str, str, Prepare | None, str]] = [
    ("--artifacts a folder with no artifact", "serve --artifacts {data}", None, "no microtune"),
    ("--artifacts missing", "serve --artifacts {ws}/missing", None, "no microtune"),
    ("--artifact-root missing", f"{SERVE} --artifact-root {{ws}}/missing", None, "artifact-root"),
    ("--artifact-root a file", f"{SERVE} --artifact-root {{ws}}/f.txt", A_FILE, "artifact-root"),
    ("--artifact-root empty", f"{SERVE} --artifact-root {{empty}}", None, "artifact-root"),
    ("--port in use", "serve --artifacts {art} --port {port}", hold_port, "cannot listen"),
    ("--port 70000", "serve --artifacts {art} --port 70000", None, "--port"),
    ("--port -1", "serve --artifacts {art} --port -1", None, "--port"),
    ("--port http", "serve --artifacts {art} --port http", None, "--port"),
    ("--host no.such.host.invalid", f"{SERVE} --host no.such.host.invalid", None, "listen"),
    ("--max-batch-size 0", f"{SERVE} --max-batch-size 0", None, "--max-batch-size"),
    ("--max-inputs -1", f"{SERVE} --max-inputs -1", None, "--max-inputs"),
    ("--max-body-kb 0", f"{SERVE} --max-body-kb 0", None, "--max-body-kb"),
    ("--max-wait-ms nan", f"{SERVE} --max-wait-ms nan", None, "--max-wait-ms"),
    ("--max-wait-ms inf", f"{SERVE} --max-wait-ms inf", None, "--max-wait-ms"),
    ("--max-copy-mb -1", f"{SERVE} --max-copy-mb -1", None, "--max-copy-mb"),
    ("--api-key blank", f"{SERVE} --api-key {{blank}}", None, "--api-key"),
    ("--device nonsense", f"{SERVE} --device nonsense", None, "device"),
]
_FEDERATE_CASES: list[tuple[str, str, str]] = [
    ("--clients 0", "--clients 0", "--clients"),
    ("--clients -3", "--clients -3", "--clients"),
    ("--clients-per-round over --clients", "--clients 3 --clients-per-round 5", "per-round"),
    ("--clients-per-round 0", "--clients-per-round 0", "per-round"),
    ("--alpha 0", "--alpha 0", "--alpha"),
    ("--alpha -1", "--alpha -1", "--alpha"),
    ("--alpha inf", "--alpha inf", "--alpha"),
    ("--alpha nan", "--alpha nan", "--alpha"),
    ("--rounds 0", "--rounds 0", "--rounds"),
    ("--local-steps 0", "--local-steps 0", "steps"),
    ("--min-replies 0", "--min-replies 0", "--min-replies"),
    ("--round-timeout 0", "--round-timeout 0", "--round-timeout"),
    ("--round-timeout nan", "--round-timeout nan", "--round-timeout"),
    ("--workers 0", "--workers 0", "--workers"),
    ("--server-lr inf", "--strategy fedadam --server-lr inf", "--server-lr"),
    ("--proximal-mu -1", "--strategy fedprox --proximal-mu -1", "--proximal-mu"),
    ("--client-dp-epsilon inf", "--client-dp-epsilon inf", "epsilon"),
    ("--method nosuch", "--method nosuch", "nosuch"),
    ("--lora-frozen-a with slash", "--lora-frozen-a", "lora"),
    ("--max-steps given", "--max-steps 3", "--local-steps"),
]


def _serve_and_federate_cases() -> list[Case]:
    cases = [Case("serve", n, a, p, expect=e) for n, a, p, e in _SERVE_CASES]
    cases += [
        Case("federate", n, f"{FEDERATE} {extra}", expect=e) for n, extra, e in _FEDERATE_CASES
    ]
    stsb = FEDERATE.replace("sst2", "stsb")
    cases.append(Case("federate", "a regression task (stsb)", stsb, expect="regression"))
    return cases


# -- (i) issue 32: exports checked against their hashes, --overwrite, what landed in round 3 -----

PREDICT_FOLDER = "predict --model-folder {{ws}}/{folder} --input {{data}}/inputs.txt"
ONNX_AGAIN = "export --artifact {art} --data-dir {data} --check-examples 8 --format onnx"


def edit_export(folder: str, change: Callable[[dict], None], reseal: bool = False) -> Prepare:
    """Edit an export's record; `reseal`: recompute its hashes, as a user who knows them would
    (what the loader itself must then refuse)."""

    def prepare(ws: Workspace) -> None:
        path = ws.root / folder / "microtune_export.json"
        record = json.loads(path.read_text())
        change(record)
        if reseal:
            body = {k: v for k, v in record.items() if k not in ("files", "record_sha256")}
            record = seal_record(body, ws.root / folder)
        path.write_text(json.dumps(record))

    return prepare


def weights_outside(folder: str) -> Prepare:
    """The folder's model.onnx rewritten to read its weights from ../outside/w.bin."""
    import onnx

    def prepare(ws: Workspace) -> None:
        graph = onnx.load(str(ws.root / folder / "model.onnx"))
        (ws.root / "outside").mkdir()
        outside = str(ws.root / "outside" / "model.onnx")
        onnx.save_model(graph, outside, save_as_external_data=True, location="w.bin")
        moved = onnx.load(outside, load_external_data=False)
        for tensor in moved.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../outside/w.bin"
        onnx.save_model(moved, str(ws.root / folder / "model.onnx"))
        (ws.root / "outside" / "model.onnx").unlink()

    return prepare


def appended(relative: str) -> Prepare:
    def prepare(ws: Workspace) -> None:
        with open(ws.root / relative, "ab") as handle:
            handle.write(b" ")

    return prepare


def swap_labels(record: dict) -> None:
    record["task"]["label_names"] = record["task"]["label_names"][::-1]


def stale_launcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain run with a launcher's variables left in its environment (no rank 1 anywhere)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("MICROTUNE_DIST_JOIN_TIMEOUT_S", "2")


PATCHES["stale launcher variables"] = stale_launcher_variables
NOTES = write("out/notes.txt", "the user's notes\n")
GARBAGE = b"\x00garbage" * 64


def another_tasks_graph(ws: Workspace) -> None:
    shutil.copy(ws.sources["onnx-b"] / "model.onnx", ws.root / "onnx" / "model.onnx")


# (what, the export folder damaged, the damage, the refusal's words)
_TAMPERED: list[tuple[str, str, Prepare, str]] = [
    ("another task's model.onnx", "onnx", another_tasks_graph, "is not the file the export"),
    ("label names edited", "onnx", edit_export("onnx", swap_labels), "changed after the export"),
    (
        "label names edited, its hash deleted",
        "onnx",
        edit_export("onnx", lambda r: [swap_labels(r), r.pop("record_sha256")]),
        "changed after the export",
    ),
    ("a garbage model.onnx", "onnx", write("onnx/model.onnx", GARBAGE), "is not the file"),
    (
        "a garbage model.onnx, hashes recomputed",
        "onnx",
        both(write("onnx/model.onnx", GARBAGE), edit_export("onnx", lambda r: None, True)),
        "onnxruntime cannot load",
    ),
    (
        "model.onnx's weights outside the folder, hashes recomputed",
        "onnx",
        both(weights_outside("onnx"), edit_export("onnx", lambda r: None, True)),
        "onnxruntime cannot load",
    ),
    (
        "a merged model's weights edited",
        "merged",
        appended("merged/0_Transformer/model.safetensors"),
        "is not the file",
    ),
    (
        "an adapter_config.json dropped beside a merged model",
        "merged",
        write("merged/adapter_config.json", "{}"),
        "did not write",
    ),
]
_MERGE_AGAIN = MERGE.removesuffix(" --output")
_PEFT_AGAIN = EXPORT.replace(" --output", " --format peft")
# (the command, its arguments, the earlier export in --output and its state, the refusal)
_OVERWRITES: list[tuple[str, str, str, Prepare, str]] = [
    ("export --format onnx", ONNX_AGAIN, "an ONNX export with the user's notes",
     both(copy_in("onnx"), NOTES), "did not write"),
    ("merge", _MERGE_AGAIN, "an ONNX export with the user's notes",
     both(copy_in("onnx"), NOTES), "did not write"),
    ("merge", _MERGE_AGAIN, "a merged export with the user's notes",
     both(copy_in("merged"), NOTES), "did not write"),
    ("export --format peft", _PEFT_AGAIN, "a merged export with the user's notes",
     both(copy_in("merged"), NOTES), "did not write"),
    ("merge", _MERGE_AGAIN, "an export whose list of files was deleted",
     both(copy_in("merged"), edit_export("out", lambda r: r.pop("files"))), "lists no files"),
]  # fmt: skip


def _round_three_cases() -> list[Case]:
    cases = [
        Case("export", f"predict --model-folder: {name}", PREDICT_FOLDER.format(folder=folder),
             both(copies(folder), damage), expect=expect)
        for name, folder, damage, expect in _TAMPERED
    ]  # fmt: skip
    cases += [
        Case("export", f"{command} --overwrite onto {onto}",
             f"{argv} --output {{out}} --overwrite", prepare, expect=expect)
        for command, argv, onto, prepare, expect in _OVERWRITES
    ]  # fmt: skip
    cases += [
        Case(
            "input",
            "predict --input a CSV with a sentence,label header",
            "predict --artifact {art} --input {ws}/my.csv",
            write("my.csv", "sentence,label\nthe film is good,1\na dull plot,0\nfun,1\n"),
            code=0,
        ),
        Case(
            "concurrent",
            "train with stale launcher variables (no rank 1)",
            train(),
            patch="stale launcher variables",
            expect="found no other process",
        ),
        Case(
            "federate",
            "--client-dp-delta 0.5",
            f"{FEDERATE} --client-dp-epsilon 8 --client-dp-delta 0.5",
            expect="--client-dp-delta",
        ),
        Case(
            "serve",
            "a causal-lm artifact beside a classifier on the same base",
            "serve --artifacts {ws}/gpt2-sst2 {causal} --port 0",
            copies("gpt2-sst2", *CAUSAL),
            expect="of its own",
        ),
        Case(
            "serve",
            "an artifact whose adapter.safetensors links out of it",
            SERVE,
            link(
                "artifact/adapter.safetensors",
                lambda ws: ws.sources["artifact"] / "adapter.safetensors",
            ),
            expect="links outside",
        ),  # fmt: skip
    ]
    return cases


CASES: list[Case] = [
    *_artifact_cases(),
    *(
        Case("data-file", name, argv, prep, expect=expect)
        for name, argv, prep, expect in _DATA_CASES
    ),
    *_FOLDER_CASES,
    *_CONCURRENT_CASES,
    *_NUMERICS_CASES,
    *_option_cases(),
    *_round_two_cases(),
    *_serve_and_federate_cases(),
    *_round_three_cases(),
]

# Cases the code does not pass yet (test id → the defect); each is a strict xfail, so fixing the
# defect makes the test fail until its line here is removed.
_CONFIG_NOT_HASHED = (
    "microtune.json is covered by no hash: a hand-edited valid value (projection seed, label "
    "names, read-out) loads and gives other predictions with exit 0"
)
_ARGPARSE = (
    "argparse's own errors print the whole usage (about 40 lines) and 'microtune train: error:', "
    "not one 'microtune: error:' line"
)
_CTRL_C = (
    "a Ctrl-C that lands where {} imports is swallowed by library code (torch's C import of "
    "numpy clears the error), so the command {}; __main__.entry could take SIGINT during the "
    "imports with a handler that prints the line and exits 130 at once (os._exit)"
)
_SAFETENSORS_FULL = (
    "a full disk inside safetensors raises SafetensorError ('No space left on device (os error "
    "28)'), not OSError: 'internal error', exit 1 (seen on a real 64 KiB tmpfs too)"
)
KNOWN_DEFECTS: dict[str, str] = {}


def counts_by_kind() -> dict[str, int]:
    """How many cases of each kind the suite runs (for the campaign's summary)."""
    counts = {kind: sum(case.kind == kind for case in CASES) for kind in KINDS}
    return {**counts, "http": len(HTTP_CASES)}


# -- the workspace and one run ------------------------------------------------------------------


@dataclass
class Workspace:
    """One case's folders: artifact, data, output, current and temporary folders (all under
    `root`), and the module's base model and runs."""

    root: Path
    base: Path
    sources: dict[str, Path] = field(default_factory=dict)
    held: list[socket.socket] = field(default_factory=list)  # listening sockets ({port})

    @property
    def art(self) -> Path:
        return self.root / "artifact"

    def argv(self, line: str) -> list[str]:
        names = {
            "art": self.art,
            "data": self.root / "data",
            "out": self.root / "out",
            "base": self.base,
            "ws": self.root,
            "empty": "",
            "blank": "   ",
            "causal": self.root / "causal",
            "gpt2": self.root / "gpt2",
            "port": self.held[0].getsockname()[1] if self.held else 0,
        }
        return [arg.format(**names) for arg in line.split()]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every path under the folders (hidden ones too) → its content hash, 'dir', or its link."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(root) / name
                if path.is_symlink():
                    found[str(path)] = "link:" + os.readlink(path)
                elif path.is_dir():
                    found[str(path)] = "dir"
                else:
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# What the `microtune` script runs, with a real SIGINT delivered the moment `sys.argv[1]` (a
# module) is first looked for: Ctrl-C at a chosen point of the start-up imports.
def microtune_file(name: str) -> bool:
    """A file microtune writes in a training folder, or the temporary file of a torn write."""
    return name in (*RUN_FILES, LOCK) or any(
        name.startswith(f".{ours}.") and name.endswith(".tmp") for ours in RUN_FILES
    )


SIGINT_SCRIPT = """
import os, signal, sys
module = sys.argv.pop(1)
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
from microtune.__main__ import entry
sys.meta_path.insert(0, CtrlC())
sys.argv[0] = "microtune"
sys.exit(entry())
"""
HOLD_SCRIPT = (
    "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
    "lock.acquire(); print('held', flush=True); time.sleep(120)"
)
STALL_SCRIPT = """
import sys, time, torch
real, calls = torch.optim.AdamW.step, [0]
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # step 2's checkpoint is on disk: wait here to be killed
        print("stalled", flush=True)
        time.sleep(120)
    return real(self, *args, **kwargs)
torch.optim.AdamW.step = step
from microtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child(script: str, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_sigint(ws: Workspace, module: str, argv: list[str]) -> tuple[int, str]:
    """Ctrl-C while the command's start-up imports `module`."""
    process = child(SIGINT_SCRIPT, module, *argv, cwd=ws.root / "cwd")
    _, err = process.communicate(timeout=120)
    return process.returncode, err


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"the case ran past its {CASE_SECONDS} s bound")


def run_in_process(argv: list[str], capfd, stdin: bytes | None = None) -> tuple[int, str]:
    capfd.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    saved = sys.stdin
    if stdin is not None:  # as a terminal in the C locale gives them: undecodable bytes escaped
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.stdin = saved
    return code, capfd.readouterr().err


def run_subprocess(ws: Workspace, argv: list[str], stdin: bytes | None) -> tuple[int, str]:
    """`python -m microtune` under a 4 GiB address-space limit and the case's time bound."""
    memory = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30,) * 2)"
    script = (
        f"{memory}; sys.argv[0] = 'microtune'; runpy.run_module('microtune', run_name='__main__')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=ws.root / "cwd",
        env=env,
        input=stdin or b"",
        capture_output=True,
        timeout=CASE_SECONDS,
    )
    return done.returncode, done.stderr.decode(errors="replace")


def run_case(case: Case, ws: Workspace, capfd, monkeypatch) -> None:
    """Prepare, snapshot, run, and assert the three outcomes."""
    for name in ("cwd", "tmp"):
        (ws.root / name).mkdir()
    if case.prepare:
        case.prepare(ws)
    in_cwd = sorted(os.listdir(ws.root / "cwd"))  # the user's own files, in some cases
    monkeypatch.chdir(ws.root / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(ws.root / "tmp"))
    if case.patch:
        PATCHES[case.patch](monkeypatch)
    holder = None
    if case.hold_lock:
        (ws.root / case.hold_lock).parent.mkdir(parents=True, exist_ok=True)
        holder = child(HOLD_SCRIPT, str(ws.root / case.hold_lock))
        assert holder.stdout.readline().strip() == "held"
    before = snapshot(ws.root, ws.base)
    argv = ws.argv(case.argv)
    try:
        if case.how.startswith("sigint:"):
            code, err = run_sigint(ws, case.how.removeprefix("sigint:"), argv)
        elif case.how == "subprocess":
            code, err = run_subprocess(ws, argv, case.stdin)
        else:
            code, err = run_in_process(argv, capfd, case.stdin)
    finally:
        if holder:
            holder.kill()
            holder.communicate()
    after = snapshot(ws.root, ws.base)

    # 1. the exit code; 2. stderr
    lines = error_lines(err)
    assert code == case.code, (code, err[-3000:])
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("microtune: error:"), err[-3000:]
        assert case.expect in lines[0], lines[0]
    elif case.code == 130:
        assert len(lines) == 1 and lines[0].startswith("microtune: interrupted"), err[-3000:]
    else:
        assert "error" not in err and "Traceback" not in err, err[-3000:]
    # 3. the files: unchanged; new ones only in a success's --output or a stopped run's log
    output = str(ws.root / case.output)
    for path, digest in before.items():
        ours = path.startswith(output + os.sep) and microtune_file(Path(path).name)
        if case.code != 0 or not ours:
            assert after.get(path) == digest, f"{path} changed or vanished"
    new = sorted(set(after) - set(before))
    if case.code == 0:
        assert all(path == output or path.startswith(output + os.sep) for path in new), new
        assert not any(Path(path).name == LOCK for path in new), "a lock file was left"
    else:
        assert new == sorted(str(ws.root / path) for path in case.leaves), new
    assert sorted(os.listdir(ws.root / "cwd")) == in_cwd and os.listdir(ws.root / "tmp") == []


# -- fixtures and the test ----------------------------------------------------------------------


def _output(argv: list[str], folder: Path) -> list[str]:
    argv[argv.index("--output") + 1] = str(folder)
    return argv


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_dirs, toy_files) -> dict[str, Path]:
    """What the cases copy: a base model of their own, the toy data as a --data-dir, a trained
    artifact, a run stopped by Ctrl-C and one killed with -9 (each after step 2's checkpoint)."""
    root = tmp_path_factory.mktemp("hostile-sources")
    base = Path(shutil.copytree(tiny_model_dirs["bert"], root / "base"))
    data = root / "data" / "glue" / "sst2"
    data.mkdir(parents=True)
    shutil.copy(toy_files / "train.jsonl", data / "train.jsonl")
    shutil.copy(toy_files / "dev.jsonl", data / "validation.jsonl")
    (root / "data" / "inputs.txt").write_text("the film is good\nawful , dull plot\n")
    ws = Workspace(root, base)
    found = {"base": base, "data": root / "data"}

    found["artifact"] = root / "artifact"
    assert cli.main(_output(ws.argv(train()), found["artifact"])) == 0

    found["interrupted"] = root / "interrupted"
    argv = _output(ws.argv(train("--checkpoint-every 2", steps=4)), found["interrupted"])
    real_step, calls = torch.optim.AdamW.step, [0]

    def interrupt_at_third(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", interrupt_at_third)
        assert cli.main(argv) == 130

    # Exports of it (issue 32's tampered folders), and an ONNX export of another run.
    found["artifact-b"] = root / "artifact-b"
    assert cli.main(_output(ws.argv(train("--seed 1")), found["artifact-b"])) == 0
    for name, argv in (
        ("onnx", ONNX_AGAIN),
        ("onnx-b", ONNX_AGAIN.replace("{art}", "{ws}/artifact-b")),
        ("merged", MERGE.removesuffix(" --output")),
    ):
        found[name] = root / name
        assert cli.main([*ws.argv(argv), "--output", str(found[name])]) == 0

    found["killed"] = root / "killed"
    argv = _output(ws.argv(train("--checkpoint-every 1", steps=4)), found["killed"])
    process = child(STALL_SCRIPT, *argv)
    try:
        assert process.stdout.readline().strip() == "stalled", process.stderr.read()
    finally:
        process.kill()
        process.communicate()
    assert (found["killed"] / CHECKPOINT).is_file() and (found["killed"] / LOCK).is_file()

    # A causal-lm artifact on a tiny GPT-2 (issue 23's generate and eval cases).
    found["gpt2"] = make_causal_model("gpt2", root / "gpt2", tie=True)
    pairs = root / "pairs.jsonl"
    pairs.write_text(rows(*[{"prompt": "the film is", "response": "good fun"}] * 8))
    found["causal"] = root / "causal"
    argv = ws.argv(
        CAUSAL_TRAIN.replace("long.jsonl", "pairs.jsonl").replace("{gpt2}", str(found["gpt2"]))
    )
    assert cli.main(_output(argv, found["causal"])) == 0
    # A classifier on the same tiny GPT-2 (a causal-lm task cannot share its loaded base).
    found["gpt2-sst2"] = root / "gpt2-sst2"
    argv = ws.argv(train().replace("{base}", str(found["gpt2"])))
    assert cli.main(_output(argv, found["gpt2-sst2"])) == 0
    return found


def _param(case: Case):
    defect = KNOWN_DEFECTS.get(case.id)
    marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
    return pytest.param(case, id=case.id, marks=marks)


def test_every_case_is_named_once_and_every_known_defect_is_a_case():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert set(KNOWN_DEFECTS) <= set(ids)
    assert {case.kind for case in CASES} | {"http"} == set(KINDS)
    assert len({case.name for case in HTTP_CASES}) == len(HTTP_CASES)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile_case(case: Case, sources, tmp_path, capfd, monkeypatch):
    ws = Workspace(tmp_path / "ws", sources["base"], sources)
    ws.root.mkdir()
    shutil.copytree(sources["artifact"], ws.art)
    shutil.copytree(sources["data"], ws.root / "data")
    try:
        run_case(case, ws, capfd, monkeypatch)
    finally:
        for sock in ws.held:
            sock.close()
    assert os.listdir(tmp_path) == ["ws"]  # nothing beside the workspace


# -- issue 23's checks that are not a command line's outcome ------------------------------------


def test_the_model_card_takes_epsilon_from_the_hashed_record(sources):
    """metrics.json is covered by no hash: an edited epsilon there never reaches the card."""
    from microtune.artifacts.push import model_card

    config = json.loads((sources["artifact"] / "microtune.json").read_text())
    config["privacy"] = {"epsilon": 3.0, "delta": 1e-5, "sigma": 1.1, "clip": 1.0, "steps": 2}
    card = model_card(config, {"epsilon": 0.01, "metrics": {}}, "user/repo", 100)
    assert "ε = 3.0" in card and "0.01" not in card
    assert "ε" not in model_card({**config, "privacy": None}, {"epsilon": 0.01}, "user/repo", 100)


def test_rows_that_lose_every_response_token_are_counted_in_a_warning():
    from microtune.tasks.spec import Example
    from microtune.tasks.types import get_task_type
    from tests.conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "[SEP]"
    examples = [Example(("the film is " * 6, "good"), ()), Example(("the film", "good"), ())]
    with pytest.warns(UserWarning, match="1 of 2 examples lose every response token"):
        _, labels = get_task_type("causal-lm").encode(tokenizer, examples, 8)
    assert len(labels) == 2


def test_microtune_load_refuses_an_edit_whose_content_hash_was_deleted(sources, tmp_path):
    import microtune
    from microtune.errors import MicrotuneError

    artifact = Path(shutil.copytree(sources["artifact"], tmp_path / "artifact"))
    edit_config("method_config.projection_seed", 1)(Workspace(tmp_path, sources["base"]))
    config = json.loads((artifact / "microtune.json").read_text())
    del config["config_sha256"]
    (artifact / "microtune.json").write_text(json.dumps(config))
    with pytest.raises(MicrotuneError, match="config_sha256 is missing"):
        microtune.load(artifact)


# -- the server's malformed and oversized requests: one live server, one table ------------------


@dataclass(frozen=True)
class HttpCase:
    """One request to the live server and the 4xx it must get: a JSON body {"error": one line
    holding `expect`}; the server answers /health afterwards."""

    name: str
    method: str
    path: str
    status: int
    expect: str
    json: object = None
    content: bytes | None = None
    chunks: int = 0  # the content sent in this many chunks, with no Content-Length


def _post(name: str, path: str, status: int, expect: str, body: object) -> HttpCase:
    return HttpCase(name, "POST", path, status, expect, json=body)


def _raw(name: str, content: bytes, status: int, expect: str, chunks: int = 0) -> HttpCase:
    return HttpCase(name, "POST", "/v1/predict", status, expect, content=content, chunks=chunks)


def _predict(name: str, status: int, expect: str, **body) -> HttpCase:
    return _post(name, "/v1/predict", status, expect, {"task": "sst2", "inputs": ["fun"], **body})


def _generate(name: str, status: int, expect: str, **body) -> HttpCase:
    body = {"task": "sst2", "prompts": ["the film"], **body}
    return _post(name, "/v1/generate", status, expect, body)


def _load(label: str, status: int, expect: str, **body) -> HttpCase:
    return _post(label, "/v1/tasks", status, expect, body)


HTTP_BODY_KB = 64  # the live server's --max-body-kb
HTTP_CASES: list[HttpCase] = [
    HttpCase("GET an unknown path", "GET", "/v1/nothing", 404, "Not Found"),
    HttpCase("GET /v1/predict", "GET", "/v1/predict", 405, "Method Not Allowed"),
    HttpCase("DELETE an unknown task", "DELETE", "/v1/tasks/nosuch", 404, "unknown task"),
    _raw("body not JSON", b"{", 400, "malformed JSON"),
    _raw("body not UTF-8", b"\xff\xfe{}", 400, "malformed JSON"),
    _raw("body empty", b"", 400, "malformed JSON"),
    _raw("body a JSON list", b"[1, 2]", 422, "JSON object"),
    _raw("body a JSON string", b'"fun"', 422, "JSON object"),
    _raw("JSON nested 30000 deep", b"[" * 30000 + b"]" * 30000, 400, "nested"),
    _raw("NaN as an input", b'{"task": "sst2", "inputs": [NaN]}', 422, "input 0"),
    _raw("body over --max-body-kb", b" " * (HTTP_BODY_KB + 1) * 1024, 413, "KiB"),
    _raw("chunked body over --max-body-kb", b" " * (HTTP_BODY_KB + 1) * 1024, 413, "KiB", 4),
    _post("no task", "/v1/predict", 422, '"task"', {"inputs": ["fun"]}),
    _predict("task a number", 422, '"task"', task=5),
    _predict("unknown task", 404, "unknown task", task="nosuch"),
    _predict("no inputs", 422, '"inputs"', inputs=None),
    _predict("inputs empty", 422, '"inputs"', inputs=[]),
    _predict("inputs a string", 422, '"inputs"', inputs="fun"),
    _predict("inputs over --max-inputs", 422, '"inputs"', inputs=["fun"] * 5),
    _predict("an input a number", 422, "input 0", inputs=[1]),
    _predict("an input null", 422, "input 0", inputs=[None]),
    _predict("an input a nested list", 422, "input 0", inputs=[["a", ["b"]]]),
    _predict("an input an object of numbers", 422, "input 0", inputs=[{"sentence": 3}]),
    _predict("an input of an unknown column", 422, "sentence", inputs=[{"nope": "fun"}]),
    _raw("a lone surrogate", b'{"task": "sst2", "inputs": ["\\udc80 fun"]}', 400, "UTF-8"),
    _generate("generate on a classifier", 422, "generat", max_new_tokens=4),
    _generate("generate: prompts a string", 422, '"prompts"', prompts="the film"),
    _generate("generate: max_new_tokens 0", 422, "max_new_tokens", max_new_tokens=0),
    _generate("generate: max_new_tokens huge", 422, "max_new_tokens", max_new_tokens=10**9),
    _generate("generate: max_new_tokens text", 422, "max_new_tokens", max_new_tokens="5"),
    _load("load: no path", 422, '"path"'),
    _load("load: path a number", 422, '"path"', path=3),
    _load("load: path with ..", 403, "..", path="../served"),
    _load("load: an absolute path outside the root", 403, "not inside", path="/etc"),
    _load("load: a symlink out of the root", 403, "not inside", path="link-out"),
    _load("load: the root itself", 403, "not inside", path="."),
    _load("load: a missing folder", 404, "no artifact folder", path="missing"),
    _load("load: a folder with no artifact", 422, "microtune.json", path="empty"),
    _load("load: a broken microtune.json", 422, "microtune.json", path="broken"),
    _load("load: a name with /", 422, '"name"', path="again", name="a/b"),
    _load("load: an empty name", 422, '"name"', path="again", name=""),
    _load("load: a name taken", 409, "already loaded", path="again", name="sst2"),
    # issue 32: fields the server does not honour, a bool as a count, a file linked out
    _generate("generate: temperature", 422, "temperature", temperature=0.7),
    _generate("generate: stream", 422, "stream", stream=True),
    _generate("generate: max_new_tokens true", 422, "max_new_tokens", max_new_tokens=True),
    _predict("predict: temperature", 422, "temperature", temperature=0.7),
    _load("load: an adapter.safetensors linked out of the root", 403, "links", path="file-out"),
]


@pytest.fixture(scope="module")
def live_server(sources, tmp_path_factory):
    """One real uvicorn server (tests/test_server.py's `live`) on the module's artifact, with an
    artifact root holding a copy, an empty folder, a broken artifact and a link out of it."""
    from microtune.serving.multitask import load_many
    from tests.test_server import live

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(sources["artifact"], root / "again")
    (root / "empty").mkdir()
    broken = Path(shutil.copytree(sources["artifact"], root / "broken"))
    (broken / "microtune.json").write_text("{")
    (root / "link-out").symlink_to(sources["artifact"])
    file_out = Path(shutil.copytree(sources["artifact"], root / "file-out"))
    (file_out / "adapter.safetensors").unlink()
    (file_out / "adapter.safetensors").symlink_to(sources["artifact"] / "adapter.safetensors")
    engine = load_many({"sst2": sources["artifact"]})
    settings = {"max_body_kb": HTTP_BODY_KB, "max_inputs": 4, "max_new_tokens": 8}
    with live(engine, artifact_root=str(root), **settings) as (client, server):
        yield client, server


@pytest.mark.parametrize("case", HTTP_CASES, ids=[f"http: {c.name}" for c in HTTP_CASES])
def test_http_case(case: HttpCase, live_server):
    client, server = live_server
    content = case.content
    if case.chunks:  # a generator: httpx sends it chunked, with no Content-Length
        size = -(-len(case.content) // case.chunks)
        content = (case.content[i : i + size] for i in range(0, len(case.content), size))
    response = client.request(case.method, case.path, json=case.json, content=content)
    assert response.status_code == case.status, response.text[:2000]
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert "\n" not in body["error"] and case.expect in body["error"], body["error"]
    assert client.get("/health").status_code == 200 and not server.should_exit


def test_the_server_still_answers_after_the_http_table(live_server):
    client, _ = live_server
    response = client.post("/v1/predict", json={"task": "sst2", "inputs": ["fun", "dull"]})
    assert response.status_code == 200, response.text
    assert [task["name"] for task in client.get("/v1/tasks").json()["tasks"]] == ["sst2"]
