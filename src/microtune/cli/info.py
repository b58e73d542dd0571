"""`microtune info`: describe an artifact, or list what is supported."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli.common import ARTIFACT_HELP
from microtune.common.choices import DEFAULT_MODEL, READOUTS
from microtune.tasks.spec import TASKS
from microtune.version import __version__


def add(commands) -> None:
    info = commands.add_parser("info", help="describe an artifact, or list what is supported")
    info.add_argument("--artifact", help=ARTIFACT_HELP + " to describe")


def _methods() -> dict[str, dict[str, Any]]:
    from microtune.methods import method_class, method_names

    classes = {name: method_class(name) for name in method_names()}
    return {
        name: {"mergeable": cls.mergeable, "default_lr": cls.default_learning_rate}
        for name, cls in classes.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import artifact_summary
    from microtune.backbone.arch import ARCHITECTURES

    if args.artifact:
        return artifact_summary(args.artifact)
    return {
        "version": __version__,
        "default_model": DEFAULT_MODEL,
        "methods": _methods(),
        "tasks": {
            name: {"type": t.type, "num_labels": t.num_labels, "metrics": list(t.metrics)}
            for name, t in TASKS.items()
        },
        "architectures": sorted(ARCHITECTURES),
        "readouts": list(READOUTS),
    }
