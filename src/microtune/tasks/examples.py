"""Examples of a task, read through its task type: the label set read from training rows, rows
turned into examples, whole splits loaded, and the task record an artifact stores.

The task records and raw readers live in `microtune.tasks.spec` (no torch); this module is where
a task meets its `TaskType` (`microtune.tasks.types`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from microtune.errors import MicrotuneError
from microtune.tasks.spec import TASKS, Example, Task, get_task, load_rows
from microtune.tasks.types import task_type_of, type_of


def with_data_labels(
    task: Task,
    rows: list[dict],
    source: str,
    label_column: str | None = None,
    labels: tuple[str, ...] | None = None,
) -> Task:
    """The task with its label set read from training rows: the task type's order (sorted;
    numbers numerically; "O" first for tags) unless `labels` fixes it, then it must hold every
    label seen."""
    column = label_column or task.label_column
    seen = type_of(task).seen_labels(rows, column, source)
    if labels:
        labels = tuple(label.strip() for label in labels)
        if len(set(labels)) != len(labels) or not all(labels):
            raise MicrotuneError(f"--labels {','.join(labels)} has an empty or repeated name")
        unknown = sorted(seen - set(labels))
        if unknown:
            raise MicrotuneError(
                f"{source}: label(s) {', '.join(unknown)} are not in --labels {','.join(labels)}"
            )
        names = labels
    else:
        names = type_of(task).order_labels(seen)
    if len(names) < 2:
        raise MicrotuneError(
            f"{source}: only the label(s) {', '.join(names)} occur; classification needs two "
            "or more (or use --task regression for a number)"
        )
    return dataclasses.replace(task, num_labels=len(names), label_names=tuple(names))


def rows_to_examples(
    task: Task,
    rows: list[dict],
    source: str,
    text_columns: tuple[str, ...] | None = None,
    label_column: str | None = None,
) -> list[Example]:
    """Turn raw rows into examples, checking that the columns exist and hold text."""
    columns = text_columns or task.text_columns
    label_column = label_column or task.label_column
    if not rows:
        raise MicrotuneError(f"{source} has no rows")
    wanted = (*columns, label_column) if label_column else columns  # causal LM: no labels
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise MicrotuneError(
            f"{source}: missing column(s) {missing}; found {sorted(rows[0])}. "
            "Map yours with --text-columns and --label-column"
        )
    examples = []
    for number, row in enumerate(rows, 1):
        where = f"{source}, row {number}"
        absent = [c for c in wanted if c not in row]
        if absent:
            raise MicrotuneError(f"{where}: missing column(s) {absent}")
        empty = [c for c in wanted if row[c] is None]  # JSON null, short CSV
        if empty:
            raise MicrotuneError(f"{where}: no value in column(s) {empty}")
        examples.append(type_of(task).read_example(task, row, columns, label_column, where))
    if not any(_has_text(row[c]) for row in rows for c in columns):
        raise MicrotuneError(
            f"{source}: every text in column(s) {list(columns)} is empty; check --text-columns "
            "or the file"
        )
    return examples


def _has_text(value) -> bool:
    """Whether a cell holds any text (a token task's cell is a list of words)."""
    if isinstance(value, list):
        return any(_has_text(item) for item in value)
    return bool(str(value).strip())


def examples_fingerprint(examples: list[Example]) -> str:
    """A hash of the examples' texts and labels, in order: what `--resume` checks, so that a
    run never continues on data that changed under it (even at the same row count)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([list(example.texts), example.label], default=str).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def load_examples(
    task: Task,
    split: str,
    data_dir: str | os.PathLike | None = None,
    data_file: str | os.PathLike | None = None,
    text_columns: tuple[str, ...] | None = None,
    label_column: str | None = None,
) -> list[Example]:
    """Examples of one split: from a file, a data folder, or the hub (in that order)."""
    rows, source = load_rows(task, split, data_dir, data_file)
    return rows_to_examples(task, rows, source, text_columns, label_column)


def task_record(
    task: Task, text_columns: tuple[str, ...] | None = None, label_column: str | None = None
) -> dict[str, Any]:
    """The task as an artifact stores it, with the columns its training data used."""
    return {
        "name": task.name,
        "type": task.type,
        "num_labels": task.num_labels,
        "metrics": list(task.metrics),
        "text_columns": list(text_columns or task.text_columns),
        "label_column": label_column or task.label_column,
        "label_names": list(task.label_names),
        "dev_split": task.dev_split,
    }


def task_from_record(record: dict[str, Any]) -> Task:
    """The registered task of that name (with its hub source), else one rebuilt from the record.

    The record comes from a schema-checked artifact (`artifacts.schema`: its name and dev split
    cannot be paths); a registered name must also agree with the registry on the labels."""
    if record["name"] in TASKS:
        task = get_task(record["name"])
        if task.labels_from_data:  # the label set the training data gave, in its order
            task = dataclasses.replace(
                task, num_labels=record["num_labels"], label_names=tuple(record["label_names"])
            )
        if task.num_labels != record["num_labels"]:
            raise MicrotuneError(
                f"the artifact's task '{task.name}' has {record['num_labels']} labels but the "
                f"registered task has {task.num_labels}; re-train or restore the artifact"
            )
        # The shape its training data had (causal LM: prompt/response or text).
        return type_of(task).fit_rows(task, [], tuple(record["text_columns"]))
    return Task(
        record["name"],
        tuple(record["text_columns"]),
        record["num_labels"],
        tuple(record["metrics"]),
        record["dev_split"],
        tuple(record["label_names"]),
        type=task_type_of(record).name,
        label_column=record.get("label_column", "label"),
    )


def load_split(
    task: Task,
    split: str,
    data_dir=None,
    data_file=None,
    text_columns=None,
    label_column: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Examples of one split, the first `limit` of them when given."""
    examples = load_examples(task, split, data_dir, data_file, text_columns, label_column)
    return examples if limit is None else examples[:limit]
