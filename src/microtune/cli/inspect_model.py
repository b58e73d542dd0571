"""`microtune inspect`: the architecture map microtune would use for a model."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.common.choices import DEFAULT_MODEL


def add(commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="print the architecture map microtune would use for a model",
        description="Print the architecture map for a model: declared (microtune/arch.py) or "
        "discovered from its structure, the number of blocks, hidden size D, FFN size F and "
        "every path.",
    )
    inspect.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub id or local model folder (default packaged)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.backbone.arch import describe
    from microtune.backbone.load import load_backbone

    backbone, _ = load_backbone(args.model)
    return describe(backbone)
