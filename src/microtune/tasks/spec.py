"""The task registry (what the data is and how it is scored) and reading its raw rows; no
torch here, so the command line lists the tasks without loading the heavy stack.

Examples come from a folder laid out like `../shared/data` (`glue/<task>/<split>.jsonl`), from a
user's own CSV/TSV/JSON/JSONL file with a column mapping, or from the Hugging Face hub by name.
All three give the same rows, which `tasks.examples` turns into `Example`s through the task's
type, so the rest of the library never knows the source.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from microtune.common.hub import is_offline
from microtune.errors import MicrotuneError


@dataclass(frozen=True)
class Task:
    """A task: its data's columns, its labels, how it is scored and what type it is.

    Attributes:
        name: the registry name (sst2, mrpc, conll2003, classification, ...).
        text_columns: one column (single sentence) or two (sentence pair); for token
            classification the one column of words.
        num_labels: number of classes (the head's width); 1 means regression with an MSE loss;
            0 until a task whose labels come from the data has read them (`with_data_labels`).
        metrics: metric keys reported on the dev set; the first is the one to watch.
        dev_split: name of the split used for evaluation.
        label_names: class names, so files with string labels can be read.
        hub: (dataset, config) for `datasets.load_dataset` when online.
        type: the task type's registry name (`microtune.tasks.types`).
        label_column: the label column of its data files (a user's may be mapped).
        folder: the data folder's subfolder that holds `<name>/<split>.jsonl`.
        labels_from_data: the label set is read from the training data (sorted, or as given
            by --labels) and labels are read by name only.
        label_range: a regression task's declared (lowest, highest) label, checked on read.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    dev_split: str = "validation"
    label_names: tuple[str, ...] = ()
    hub: tuple[str, str] = field(default=("", ""))
    type: str = "classification"
    label_column: str = "label"
    folder: str = "glue"
    labels_from_data: bool = False
    label_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


def _glue(
    name: str,
    columns: tuple[str, ...],
    labels: tuple[str, ...],
    metrics: tuple[str, ...],
    dev_split: str = "validation",
) -> Task:
    num_labels = max(len(labels), 1)
    kind = "classification" if labels else "regression"
    hub = ("nyu-mll/glue", name)
    return Task(name, columns, num_labels, metrics, dev_split, labels, hub, type=kind)


# Entity-level scores over BIO spans (seqeval); per-type F1 comes as f1_<TYPE> beside them.
_NER_METRICS = ("f1", "precision", "recall")
# Tasks on the user's own files (--train-file / --dev-file): the label set comes from the data.
USER_TASKS = ("classification", "regression", "token-classification", "causal-lm")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
        _glue(
            "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")
        ),
        _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
        replace(
            _glue("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman")),
            label_range=(0.0, 5.0),  # similarity scores 0..5 (GLUE's STS-B)
        ),
        _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        _glue(
            "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")
        ),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            dev_split="validation_matched",
        ),
        Task(
            "conll2003",
            ("tokens",),
            0,
            _NER_METRICS,
            type="token-classification",
            label_column="ner_tags",
            folder="ner",
            labels_from_data=True,
        ),
        Task("classification", ("text",), 0, ("accuracy", "macro_f1"), labels_from_data=True),
        Task("regression", ("text",), 1, ("pearson", "spearman"), type="regression"),
        Task(
            "token-classification",
            ("tokens",),
            0,
            _NER_METRICS,
            type="token-classification",
            label_column="ner_tags",
            labels_from_data=True,
        ),
        # prompt/response or text rows (`CausalLM.fit_rows` picks the shape): no label column,
        # and num_labels 1 is a placeholder: the head is the base model's own LM head.
        Task(
            "causal-lm",
            ("prompt", "response"),
            1,
            ("exact_match", "perplexity", "loss"),
            type="causal-lm",
            label_column="",
        ),
    )
}


def register_task(task: Task) -> Task:
    """Add a named task (a name already taken is refused); returns it."""
    if task.name in TASKS:
        raise MicrotuneError(f"task '{task.name}' is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise MicrotuneError(f"task '{name}' is unknown; available: {', '.join(TASKS)}") from None


@dataclass(frozen=True)
class Example:
    """One example: its texts (for token classification: its words) and its label (a class
    index, a number, or for token classification one tag index per word)."""

    texts: tuple[str, ...]
    label: float | int | tuple[int, ...]


@dataclass(frozen=True)
class DataSource:
    """Where a run's examples come from and which of them it reads: a data folder laid out
    like ../shared/data, the user's own files, or (neither) the hub."""

    data_dir: str | None = field(default=None, metadata={"help": "a folder <task>/<split>.jsonl"})
    train_file: str | None = field(default=None, metadata={"help": "your CSV/TSV/JSON(L) rows"})
    dev_file: str | None = field(default=None, metadata={"help": "your dev rows (with train)"})
    train_rows: Any = field(
        default=None,
        metadata={
            "help": "rows in memory: a list of dicts, a pandas DataFrame, a datasets.Dataset"
        },
    )
    dev_rows: Any = field(default=None, metadata={"help": "dev rows in memory (with train_rows)"})
    text_columns: tuple[str, ...] | None = field(
        default=None, metadata={"help": "the text column(s) of your files"}
    )
    label_column: str | None = field(default=None, metadata={"help": "the label column"})
    max_train_examples: int | None = field(
        default=None, metadata={"help": "read only the first N training rows"}
    )
    labels: tuple[str, ...] | None = field(
        default=None, metadata={"help": "the label order of a task whose labels come from data"}
    )

    def __post_init__(self) -> None:
        for name in ("train_file", "dev_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise MicrotuneError(
                    f"{name} takes a path, not a {type(value).__name__}; pass rows in memory (a "
                    f"list of dicts, a DataFrame, a datasets.Dataset) as {name[:-5]}_rows"
                )
        for split in ("train", "dev"):
            if getattr(self, f"{split}_file") is not None and self.rows(split) is not None:
                raise MicrotuneError(f"give {split}_file or {split}_rows, not both")
            if isinstance(self.rows(split), (str, os.PathLike)):
                raise MicrotuneError(
                    f"{split}_rows takes rows in memory; pass a path as {split}_file"
                )
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise MicrotuneError(
                f"--max-train-examples must be at least 1, got {self.max_train_examples}"
            )

    def check_for_training(self) -> None:
        """Training reads both splits from one kind of source (evaluation needs the dev rows
        alone)."""
        if (self.file("train") is None) != (self.file("dev") is None):
            raise MicrotuneError("give --train-file and --dev-file together (or --data-dir)")

    def rows(self, split: str) -> Any:
        return self.train_rows if split == "train" else self.dev_rows

    def file(self, split: str) -> Any:
        """The split's own data, a path or rows in memory (None: the data folder or the hub)."""
        rows = self.rows(split)
        return rows if rows is not None else getattr(self, f"{split}_file")


def rows_in_memory(value: Any, what: str) -> list[dict]:
    """Rows given in memory as a list of dicts: a sequence of mappings, a pandas DataFrame or
    a `datasets.Dataset` (duck-typed, so neither library is imported here)."""
    if hasattr(value, "columns") and hasattr(value, "to_dict"):  # pandas.DataFrame
        value = value.to_dict("records")
    elif hasattr(value, "column_names") and hasattr(value, "to_list"):  # datasets.Dataset
        value = value.to_list()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise MicrotuneError(
            f"{what} must be a list of dicts, a pandas DataFrame or a datasets.Dataset; got "
            f"{type(value).__name__}"
        )
    for number, row in enumerate(value, 1):
        if not isinstance(row, Mapping) or not all(isinstance(k, str) for k in row):
            raise MicrotuneError(f"{what}, row {number}: not a mapping of column name to value")
    return [dict(row) for row in value]


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv, .tsv, .json (a list, or {"data": [...]}) or .jsonl file.

    Every row is a dict; anything else (text that is not UTF-8, a JSON element that is not an
    object, a CSV line with more fields than the header) is a one-line error naming the place.
    """
    path = Path(path)
    if not path.is_file():
        raise MicrotuneError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json", ".jsonl"):
        raise MicrotuneError(
            f"data file {path}: unsupported type '{suffix}'; use csv, tsv, json(l)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark would end up in the first column name
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise MicrotuneError(
            f"{path}, line {line}: not UTF-8 text (byte {error.start}); save the file as UTF-8"
        ) from None
    if suffix in (".csv", ".tsv"):
        return _csv_rows(text, path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # perhaps JSON lines saved as .json
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, list):
            for number, row in enumerate(data, 1):
                if not isinstance(row, dict):
                    raise MicrotuneError(
                        f"{path}, element {number}: expected a JSON object, got "
                        f"{type(row).__name__}"
                    )
            return data
    return _json_lines(text, path)


def _csv_rows(text: str, path: Path, delimiter: str) -> list[dict]:
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:  # DictReader keeps the last of them without a word
            raise MicrotuneError(
                f"{path}: the header names column(s) {repeated} more than once; rename them"
            )
        for row in reader:
            if header and list(row.values()) == header:
                raise MicrotuneError(
                    f"{path}, line {reader.line_num}: the header line again (files joined "
                    "with their headers?); delete that line"
                )
            if None in row:  # DictReader's key for fields past the header's
                raise MicrotuneError(
                    f"{path}, line {reader.line_num}: more fields than the header's "
                    f"{len(reader.fieldnames or [])}; quote fields that hold '{delimiter}'"
                )
            rows.append(row)
    except csv.Error as error:
        raise MicrotuneError(f"{path}, line {reader.line_num}: {error}") from None
    return rows


def _json_lines(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MicrotuneError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise MicrotuneError(f"{path}, line {number}: expected a JSON object per line")
        rows.append(row)
    return rows


def check_path_name(value: str, what: str) -> str:
    """A name that becomes part of a path (a task name, a split, a bench name) as one plain
    file-name part, never a way out of its folder."""
    if (
        not isinstance(value, str)
        or not value
        or value == "."
        or ".." in value
        or any(sep in value for sep in ("/", "\\", os.sep, "\0"))
    ):
        raise MicrotuneError(
            f"{what} {value!r} cannot name a data file or folder: use a plain name without "
            "'/', '\\' or '..'"
        )
    return value


def split_file(data_dir: str | os.PathLike, task: Task, split: str) -> Path:
    """The file for a split in a folder laid out like ../shared/data (never outside it)."""
    folder = Path(data_dir) / task.folder / check_path_name(task.name, "task name")
    split = check_path_name(split, "split")
    for suffix in (".jsonl", ".json", ".csv", ".tsv"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(Path(data_dir).resolve()):  # via a link
                raise MicrotuneError(
                    f"{candidate} leads outside --data-dir {data_dir}; copy the file into it"
                )
            return candidate
    raise MicrotuneError(
        f"no '{split}' split for {task.name} in {folder} (expected {split}.jsonl); check --data-dir"
    )


def _convert_label(task: Task, value, source: str) -> float | int:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        # JSON true/false/null, arrays and objects: never a label (True would train as 1)
        raise MicrotuneError(f"{source}: label {json.dumps(value)} is not a valid label")
    if task.is_regression:
        try:
            label = float(value)
        except (TypeError, ValueError):
            raise MicrotuneError(f"{source}: label {value!r} is not a number") from None
        if not math.isfinite(label):
            raise MicrotuneError(
                f"{source}: label {value!r} is not a finite number; fix or drop that row"
            )
        if task.label_range and not task.label_range[0] <= label <= task.label_range[1]:
            low, high = task.label_range
            raise MicrotuneError(
                f"{source}: label {value!r} is outside {task.name}'s range {low:g}..{high:g}; "
                "fix or drop that row"
            )
        return label
    if task.labels_from_data:
        key = label_key(value, source)
        if key not in task.label_names:
            raise MicrotuneError(
                f"{source}: label {key!r} is not one of the training labels "
                f"{', '.join(task.label_names)}; fix the row, or give --labels with every label"
            )
        return task.label_names.index(key)
    if isinstance(value, str) and value in task.label_names:
        return task.label_names.index(value)
    label = _class_index(value)
    if label is None:
        raise MicrotuneError(
            f"{source}: label {value!r} is not a class index or one of {task.label_names}"
        )
    if not 0 <= label < task.num_labels:
        raise MicrotuneError(
            f"{source}: label {label} is outside 0..{task.num_labels - 1} "
            "(unlabelled test splits cannot be used to train or evaluate)"
        )
    return label


def label_key(value, source: str) -> str:
    """A label read by name: text as it is (stripped), a whole number as its digits (3, 3.0
    and "3" are one label); anything else is refused."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise MicrotuneError(f"{source}: label {json.dumps(value)} is not a valid label")
    index = _class_index(value)
    if index is not None:
        return str(index)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise MicrotuneError(f"{source}: label {value!r} is not a name or a whole number")


def _class_index(value) -> int | None:
    """A whole number given as an int, a whole float (1.0) or its text ("1"); else None, so
    that 0.7 or "1.5" are refused rather than truncated."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = value.strip()
        if value.lstrip("-").isdigit():
            return int(value)
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def sentence_example(
    task: Task, row: dict, columns: tuple[str, ...], label_column: str, where: str
) -> Example:
    """A sentence(-pair) example: the text columns' values and the converted label."""
    label = _convert_label(task, row[label_column], where)
    texts = [row[c] for c in columns]
    if any(isinstance(t, (list, dict, bool)) for t in texts):
        raise MicrotuneError(f"{where}: a text column holds {texts}, not text")
    return Example(tuple(str(t) for t in texts), label)


def load_rows(
    task: Task,
    split: str,
    data_dir: str | os.PathLike | None = None,
    data_file: str | os.PathLike | None = None,
) -> tuple[list[dict], str]:
    """(raw rows, where they came from) of one split: a file (or rows in memory, see
    `DataSource`), a data folder, or the hub."""
    if data_file is not None and not isinstance(data_file, (str, os.PathLike)):
        return rows_in_memory(data_file, f"the {split} rows"), f"the {split} rows"
    if data_file is not None:
        return read_rows(data_file), str(data_file)
    if task.name in USER_TASKS:
        raise MicrotuneError(
            f"--task {task.name} trains on your own files: give --train-file and --dev-file "
            "(--data-file for eval and export)"
        )
    if data_dir is not None:
        path = split_file(data_dir, task, split)
        return read_rows(path), str(path)
    return _hub_rows(task, split), f"hub {task.hub}"


def _hub_rows(task: Task, split: str) -> list[dict]:
    if not task.hub[0]:
        raise MicrotuneError(
            f"no data for {task.name}: pass --data-dir (a folder with "
            f"{task.folder}/{task.name}/{split}.jsonl, e.g. ../shared/data)"
        )
    if is_offline():
        raise MicrotuneError(
            f"no data for {task.name}: offline and no --data-dir; pass --data-dir ../shared/data"
        )
    try:
        from datasets import load_dataset
    except ImportError:
        raise MicrotuneError(
            "loading from the hub needs `datasets`: pip install 'microtune[hub]', "
            "or pass --data-dir"
        ) from None
    return list(load_dataset(*task.hub, split=split))
