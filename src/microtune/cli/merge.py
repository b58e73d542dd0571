"""`microtune merge`: fold an artifact into the base weights; a standard model folder."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli.common import add_folder_options

TEXT = "fold an artifact into the base weights and write a standard model folder"


def add(commands) -> None:
    add_folder_options(commands.add_parser("merge", help=TEXT, description=TEXT))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import merge_artifact

    return merge_artifact(args.artifact, args.output, args.model, overwrite=args.overwrite)
