"""`microtune eval`: evaluate an artifact; prints one JSON object."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli.common import ARTIFACT_HELP, MODEL_HELP, add_data_options
from microtune.tasks.spec import TASKS


def add(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate an artifact; prints one JSON object")
    evaluate.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    evaluate.add_argument("--task", choices=sorted(TASKS), help="task (default: the artifact's)")
    evaluate.add_argument("--split", help="split name (default: the task's dev split)")
    evaluate.add_argument("--model", help=MODEL_HELP)
    add_data_options(evaluate, training=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import evaluate_artifact

    return evaluate_artifact(
        args.artifact,
        task=args.task,
        split=args.split,
        model=args.model,
        data_dir=args.data_dir,
        data_file=args.data_file,
        text_columns=args.text_columns,
        label_column=args.label_column,
    )
