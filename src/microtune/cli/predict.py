"""`microtune predict`: label inputs with an artifact; one JSON line per input."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from microtune.cli.common import (
    ARTIFACT_HELP,
    MODEL_HELP,
    comma_list,
    loading_message,
    read_inputs,
)
from microtune.errors import MicrotuneError


def add(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="label texts with an artifact; prints one JSON line per input",
        description="Label inputs with an artifact (unmerged), or with an export folder as "
        "its own runtime loads it (--model-folder: transformers, sentence-transformers, "
        "onnxruntime, backbone + head): one JSON line "
        '{"label": ..., "score": ...} per input, in order. Inputs are lines of text, or JSON '
        "objects with the task's text columns (needed for pair tasks), from --input or stdin; "
        "a .csv, .tsv, .json or .jsonl --input is read as `train` reads it: a row per input, "
        "its text columns by --text-columns.",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help=ARTIFACT_HELP)
    source.add_argument(
        "--model-folder",
        help="an export folder (microtune export / merge, any --format), run as written",
    )
    predict.add_argument(
        "--input",
        help="file of inputs: .txt one per line; .csv/.tsv/.json/.jsonl one per row "
        "(default: stdin, one per line)",
    )
    predict.add_argument(
        "--text-columns",
        type=comma_list,
        help="comma-separated text column(s) of a CSV/TSV/JSON(L) --input (default: the "
        "artifact's, e.g. sentence1,sentence2)",
    )
    predict.add_argument("--model", help=MODEL_HELP)
    predict.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")


def status(args: argparse.Namespace) -> str:
    """The line shown while predict loads (standard output holds only the predictions)."""
    if args.model_folder:
        return f"loading export folder {args.model_folder}…"
    return loading_message(args.artifact, args.model)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from microtune.serving.tuned import load

    if args.batch_size < 1:
        raise MicrotuneError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.model_folder:
        from microtune.serving.tuned import ExportedModel, is_export_folder

        if not is_export_folder(args.model_folder):
            raise MicrotuneError(
                f"--model-folder {args.model_folder} is not an export folder (no "
                "microtune_export.json); pass what `microtune export` wrote, or --artifact"
            )
        if (Path(args.model_folder) / "adapter_config.json").is_file():
            import microtune.peft  # noqa: F401  registers SLaSh & co. for their peft exports
        model = ExportedModel(args.model_folder, args.model)
    else:
        model = load(args.artifact, args.model)
    return model.predict(_inputs(args, model.text_columns), args.batch_size)


ROW_FILES = (".csv", ".tsv", ".json", ".jsonl")


def _inputs(args: argparse.Namespace, model_columns: tuple[str, ...]) -> list:
    """The inputs: a row file's rows (as `train` reads them), else lines of text."""
    if not args.input or Path(args.input).suffix.lower() not in ROW_FILES:
        if args.text_columns:
            raise MicrotuneError(
                "--text-columns names the columns of a .csv, .tsv, .json or .jsonl --input; "
                "drop it, or give such a file"
            )
        return read_inputs(args)
    if not Path(args.input).is_file():
        raise MicrotuneError(f"cannot read --input {args.input}: no such file")
    return row_inputs(args.input, args.text_columns, model_columns)


def row_inputs(path: str, given: tuple[str, ...] | None, model_columns: tuple[str, ...]) -> list:
    """A row file's inputs: the text columns (`given`, else the artifact's) of each row, under
    the artifact's column names; a missing or empty cell is refused, naming the row."""
    from microtune.tasks.spec import read_rows

    columns = tuple(given or model_columns)
    if len(columns) != len(model_columns):
        raise MicrotuneError(
            f"--text-columns {','.join(columns)}: the artifact reads {len(model_columns)} "
            f"text column(s) ({', '.join(model_columns)}); name as many"
        )
    rows = read_rows(path)
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if row.get(c) is None]
        if missing:
            raise MicrotuneError(
                f"{path}, row {number}: no column(s) {missing}; found {sorted(row)}. "
                "Map yours with --text-columns"
            )
    return [{name: row[c] for name, c in zip(model_columns, columns, strict=True)} for row in rows]
