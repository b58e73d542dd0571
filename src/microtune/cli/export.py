"""`microtune export`: merge (or write peft's format) and check it loads and matches."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli.common import add_folder_options
from microtune.errors import MicrotuneError

TEXT = "merge, write the model folder, and check it loads and matches with plain transformers"


def add(commands) -> None:
    export = commands.add_parser("export", help=TEXT, description=TEXT)
    add_folder_options(export)
    export.add_argument("--data-dir", help="folder of the task's data, for the check")
    export.add_argument(
        "--data-file",
        "--dev-file",  # the name train used for the same file
        dest="data_file",
        help="your own dev file, for the check of a task trained on your own files "
        "(alias: --dev-file)",
    )
    export.add_argument(
        "--check-examples",
        type=int,
        default=256,
        help="dev examples to compare merged and unmerged outputs on",
    )
    export.add_argument(
        "--format",
        choices=("merged", "peft", "onnx"),
        default="merged",
        help="merged: the method folded into the base weights, a standard model "
        "folder (a stock transformers class, else a sentence-transformers folder for mean or "
        "first-token read-outs, else backbone + head); peft (LoRA, SLaSh, JR-WARP, PaFi, HiWi): "
        "peft's adapter_config.json + adapter_model.safetensors with the head beside it, "
        "checked by loading it with PeftModel.from_pretrained (import microtune.peft for "
        "our four methods); onnx: model.onnx, the merged model with "
        "its read-out and head, checked in onnxruntime",
    )
    export.add_argument(
        "--quantize",
        choices=("int8",),
        help="with --format onnx: dynamic int8 quantisation of the weights (smaller, faster "
        "on CPUs; checked against the artifact's labels)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.format == "peft":
        from microtune.export.peft import export_peft_and_check as export
    else:
        from microtune.api import export_and_check as export
    if args.quantize and args.format != "onnx":
        raise MicrotuneError("--quantize applies to --format onnx")
    own_file = {"data_file": args.data_file} if args.data_file else {}
    if args.format == "onnx":
        own_file |= {"onnx": True, "quantize": args.quantize}
    return export(
        args.artifact,
        args.output,
        model=args.model,
        data_dir=args.data_dir,
        examples=args.check_examples,
        overwrite=args.overwrite,
        **own_file,
    )
