"""`microtune serve`: many task artifacts on one base model behind an HTTP server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from microtune.cli.common import MODEL_HELP
from microtune.cli.options import dest_of, field_argument, flagged_fields
from microtune.common.files import CONFIG_FILE
from microtune.errors import MicrotuneError
from microtune.serving.config import ServeConfig


def add(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve many task artifacts on one base model over HTTP (mixed-task batches)",
        description="Load task artifacts onto one base model and serve them over HTTP "
        "(FastAPI + uvicorn): POST /v1/predict {task, inputs}, POST /v1/generate, GET/POST "
        "/v1/tasks, DELETE /v1/tasks/NAME, /health, /ready, /metrics. Rows of different tasks "
        "share each forward pass. Ctrl-C or SIGTERM drains in-flight requests, then exits.",
    )
    serve.add_argument(
        "--artifacts",
        nargs="+",
        required=True,
        metavar="DIR",
        help="artifact folders, or folders whose sub-folders are artifacts; the task name is "
        "the folder's name",
    )
    serve.add_argument("--model", help=MODEL_HELP)
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    for field, hint, flag in flagged_fields(ServeConfig):
        serve.add_argument(flag, **field_argument(hint, field.metadata["help"], default=None))


def artifact_folders(paths: list[str]) -> dict[str, Path]:
    """{task name: folder}: each path an artifact, or a folder of artifact folders."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / CONFIG_FILE).is_file():
            folders = [path]
        elif path.is_dir():
            folders = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file())
        else:
            folders = []
        if not folders:
            raise MicrotuneError(f"{path} holds no microtune artifact ({CONFIG_FILE})")
        for folder in folders:
            name = folder.resolve().name
            if name in found:
                raise MicrotuneError(f"two artifacts are named '{name}'; rename one folder")
            found[name] = folder
    return found


def check_artifact_root(root: str | None) -> None:
    """Hot-loading's root must be an existing folder (checked before anything loads)."""
    if root is not None and (not root.strip() or not Path(root).is_dir()):
        raise MicrotuneError(
            f"--artifact-root '{root}' is not a folder; give the folder whose artifacts POST "
            "/v1/tasks may load, or leave it out (hot-loading off)"
        )


def run(args: argparse.Namespace) -> None:
    from microtune.serving.http import bind, serve, url_of
    from microtune.serving.multitask import load_many

    given = {
        field.name: getattr(args, dest_of(flag))
        for field, _, flag in flagged_fields(ServeConfig)
        if getattr(args, dest_of(flag)) is not None
    }
    config = ServeConfig(**given)
    check_artifact_root(config.artifact_root)
    engine = load_many(
        artifact_folders(args.artifacts),
        args.model,
        args.device,
        max_copy_bytes=config.max_copy_mb * 2**20,
    )
    sock = bind(config)
    print(json.dumps({"serving": url_of(sock), "tasks": len(engine.tasks)}), flush=True)
    serve(engine, config, sock)
