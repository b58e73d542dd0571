"""The task registry (what the data is and how it is scored) and loading its examples.

Examples come from a folder laid out like `../shared/data` (`glue/<task>/<split>.jsonl`), from a
user's own CSV/TSV/JSON/JSONL file with a column mapping, or from the Hugging Face hub by name.
All three give the same `Example` rows, so the rest of the library never knows the source.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from microtune.errors import MicrotuneError
from microtune.hub import is_offline


@dataclass(frozen=True)
class Task:
    """A sequence classification or regression task.

    Attributes:
        name: the registry name (sst2, mrpc, ...).
        text_columns: one column (single sentence) or two (sentence pair).
        num_labels: number of classes; 1 means regression with an MSE loss.
        metrics: metric keys reported on the dev set; the first is the one to watch.
        dev_split: name of the split used for evaluation.
        label_names: class names, so files with string labels can be read.
        hub: (dataset, config) for `datasets.load_dataset` when online.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    dev_split: str = "validation"
    label_names: tuple[str, ...] = ()
    hub: tuple[str, str] = field(default=("", ""))

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
    return Task(name, columns, num_labels, metrics, dev_split, labels, ("nyu-mll/glue", name))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
        _glue(
            "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")
        ),
        _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
        _glue("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman")),
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
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise MicrotuneError(f"task '{name}' is unknown; available: {', '.join(TASKS)}") from None


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: float | int


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv, .tsv, .json (a list, or {"data": [...]}) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise MicrotuneError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json", ".jsonl"):
        raise MicrotuneError(
            f"data file {path}: unsupported type '{suffix}'; use csv, tsv, json(l)"
        )
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        text = handle.read()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # perhaps JSON lines saved as .json
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
        if isinstance(data, list):
            return data
    return _json_lines(text, path)


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


def split_file(data_dir: str | os.PathLike, task: Task, split: str) -> Path:
    """The file for a split in a folder laid out like ../shared/data."""
    folder = Path(data_dir) / "glue" / task.name
    for suffix in (".jsonl", ".json", ".csv", ".tsv"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise MicrotuneError(
        f"no '{split}' split for {task.name} in {folder} (expected {split}.jsonl); check --data-dir"
    )


def _convert_label(task: Task, value, source: str) -> float | int:
    if task.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MicrotuneError(f"{source}: label {value!r} is not a number") from None
    if isinstance(value, str) and value in task.label_names:
        return task.label_names.index(value)
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise MicrotuneError(
            f"{source}: label {value!r} is not a class index or one of {task.label_names}"
        ) from None
    if not 0 <= label < task.num_labels:
        raise MicrotuneError(
            f"{source}: label {label} is outside 0..{task.num_labels - 1} "
            "(unlabelled test splits cannot be used to train or evaluate)"
        )
    return label


def rows_to_examples(
    task: Task,
    rows: list[dict],
    source: str,
    text_columns: tuple[str, ...] | None = None,
    label_column: str = "label",
) -> list[Example]:
    """Turn raw rows into examples, checking that the columns exist."""
    columns = text_columns or task.text_columns
    if not rows:
        raise MicrotuneError(f"{source} has no rows")
    missing = [c for c in (*columns, label_column) if c not in rows[0]]
    if missing:
        raise MicrotuneError(
            f"{source}: missing column(s) {missing}; found {sorted(rows[0])}. "
            "Map yours with --text-columns and --label-column"
        )
    examples = []
    for number, row in enumerate(rows, 1):
        where = f"{source}, row {number}"
        absent = [c for c in (*columns, label_column) if c not in row]
        if absent:
            raise MicrotuneError(f"{where}: missing column(s) {absent}")
        label = _convert_label(task, row[label_column], where)
        examples.append(Example(tuple(str(row[c]) for c in columns), label))
    return examples


def load_examples(
    task: Task,
    split: str,
    data_dir: str | os.PathLike | None = None,
    data_file: str | os.PathLike | None = None,
    text_columns: tuple[str, ...] | None = None,
    label_column: str = "label",
) -> list[Example]:
    """Examples of one split: from a file, a data folder, or the hub (in that order)."""
    if data_file is not None:
        rows = read_rows(data_file)
        return rows_to_examples(task, rows, str(data_file), text_columns, label_column)
    if data_dir is not None:
        path = split_file(data_dir, task, split)
        return rows_to_examples(task, read_rows(path), str(path), text_columns, label_column)
    return rows_to_examples(
        task, _hub_rows(task, split), f"hub {task.hub}", text_columns, label_column
    )


def _hub_rows(task: Task, split: str) -> list[dict]:
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
