"""`microtune eval`: evaluate an artifact; prints one JSON object (with per-class numbers and
the confusion matrix for classification), and the same as a readable table on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from microtune.cli.common import ARTIFACT_HELP, MODEL_HELP, add_data_options, loading_message
from microtune.tasks.spec import TASKS, DataSource


def add(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="evaluate an artifact; prints one JSON object (and a table on stderr)",
    )
    evaluate.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    evaluate.add_argument("--task", choices=sorted(TASKS), help="task (default: the artifact's)")
    evaluate.add_argument("--split", help="split name (default: the task's dev split)")
    evaluate.add_argument("--model", help=MODEL_HELP)
    evaluate.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    add_data_options(evaluate, training=False)


def status(args: argparse.Namespace) -> str | None:
    """The line shown while eval loads, before its bar (none with --no-progress)."""
    return loading_message(args.artifact, args.model) if args.progress else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import evaluate_artifact

    result = evaluate_artifact(
        args.artifact,
        task=args.task,
        split=args.split,
        model=args.model,
        data=DataSource(
            data_dir=args.data_dir,
            dev_file=args.data_file,
            text_columns=tuple(args.text_columns) if args.text_columns else None,
            label_column=args.label_column,
        ),
        progress=args.progress,
        breakdown=True,
    )
    print(table(result), file=sys.stderr)
    return result


def table(result: dict[str, Any]) -> str:
    """The metrics, then (classification) precision, recall, F1 and support per label and the
    confusion matrix (rows: the true label; columns: the predicted one), as aligned text."""
    lines = [
        f"{name:<22}{'-' if value is None else f'{value:.4f}'}"
        for name, value in result.items()
        if not isinstance(value, dict)
    ]
    per_class = result.get("per_class")
    if per_class:
        width = max(12, *(len(name) + 2 for name in per_class))
        lines += ["", f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        for name, row in per_class.items():
            numbers = "".join(f"{row[key]:>10.4f}" for key in ("precision", "recall", "f1"))
            lines.append(f"{name:<{width}}{numbers}{row['support']:>9}")
    matrix = result.get("confusion_matrix")
    if matrix:
        names = matrix["labels"]
        cell = max(8, *(len(name) + 2 for name in names))
        width = max(12, *(len(name) + 2 for name in names))
        lines += ["", "confusion matrix (rows: true label, columns: predicted)"]
        lines.append(" " * width + "".join(f"{name:>{cell}}" for name in names))
        for name, counts in zip(names, matrix["matrix"], strict=True):
            lines.append(f"{name:<{width}}" + "".join(f"{count:>{cell}}" for count in counts))
    return "\n".join(lines)
