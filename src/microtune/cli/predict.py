"""`microtune predict`: label inputs with an artifact; one JSON line per input."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli.common import ARTIFACT_HELP, MODEL_HELP, read_inputs
from microtune.errors import MicrotuneError


def add(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="label texts with an artifact; prints one JSON line per input",
        description="Label inputs with an artifact (unmerged): one JSON line "
        '{"label": ..., "score": ...} per input, in order. Inputs are lines of text, or JSON '
        "objects with the task's text columns (needed for pair tasks), from --input or stdin.",
    )
    predict.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    predict.add_argument("--input", help="file of inputs, one per line (default: stdin)")
    predict.add_argument("--model", help=MODEL_HELP)
    predict.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from microtune.serving import load

    if args.batch_size < 1:
        raise MicrotuneError(f"--batch-size must be at least 1, got {args.batch_size}")
    return load(args.artifact, args.model).predict(read_inputs(args), args.batch_size)
