"""`microtune predict`: label inputs with an artifact; one JSON line per input."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from microtune.cli.common import ARTIFACT_HELP, MODEL_HELP, read_inputs
from microtune.errors import MicrotuneError


def add(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="label texts with an artifact; prints one JSON line per input",
        description="Label inputs with an artifact (unmerged), or with an export folder as "
        "its own runtime loads it (--model-folder: transformers, sentence-transformers, "
        "onnxruntime, backbone + head): one JSON line "
        '{"label": ..., "score": ...} per input, in order. Inputs are lines of text, or JSON '
        "objects with the task's text columns (needed for pair tasks), from --input or stdin.",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help=ARTIFACT_HELP)
    source.add_argument(
        "--model-folder",
        help="an export folder (microtune export / merge, any --format), run as written",
    )
    predict.add_argument("--input", help="file of inputs, one per line (default: stdin)")
    predict.add_argument("--model", help=MODEL_HELP)
    predict.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")


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
    return model.predict(read_inputs(args), args.batch_size)
