"""`microtune push`: upload an artifact to a Hugging Face hub repo, with a model card."""

from __future__ import annotations

import argparse
from typing import Any


def add(commands) -> None:
    push = commands.add_parser(
        "push",
        help="upload an artifact to a Hugging Face hub repo, with a model card",
        description="Check that an artifact folder is complete, create the hub model repo if "
        "needed, and upload microtune.json, adapter.safetensors, metrics.json (if present) and "
        'a generated README.md in one commit. Then `microtune.load("owner/name")` and every '
        "--artifact option take the repo id. Needs a network.",
    )
    push.add_argument("--artifact", required=True, help="artifact folder to upload")
    push.add_argument("--repo", required=True, help="hub model repo id: owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push.add_argument(
        "--token", help="hub token (default: the HF_TOKEN variable or `hf auth login`)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.artifacts.push import push_artifact

    return push_artifact(
        args.artifact, args.repo, private=args.private, revision=args.revision, token=args.token
    )
