"""`microtune push`: an artifact folder to a Hugging Face hub model repo, with a model card.

The repo holds the same files as the folder (microtune.json, adapter.safetensors, metrics.json
when there is one) plus a generated README.md; `hub.resolve_artifact` fetches it back by id.
Nothing here imports huggingface_hub until a push is made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from microtune.artifacts.store import read_artifact_config, read_artifact_tensors
from microtune.common.files import CONFIG_FILE, METRICS_FILE, README_FILE, TENSORS_FILE
from microtune.common.hub import PUSH_LOGIN_HINT, hub_errors, is_offline, parse_hub_id
from microtune.errors import MicrotuneError
from microtune.methods import method_class


def push_artifact(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload the artifact `microtune train` wrote in `directory` to the model repo
    `owner/name`, with a generated model card; returns {"repo", "url", "revision", "commit",
    "commit_url", "files"}.

    The folder is checked first (its config, and the tensor file against the hash the config
    names), so nothing reaches the hub from an incomplete or stale artifact. The repo is created
    if missing (`private`: created private); one commit to `revision` (default main; a branch
    created from main if missing) adds microtune.json, adapter.safetensors, metrics.json (if
    present) and README.md, and removes a metrics.json an earlier push left. `token`: default
    the HF_TOKEN environment variable or the cached login.
    """
    folder = Path(directory)
    config = _checked_push(folder, repo_id)
    metrics = None
    if (folder / METRICS_FILE).is_file():
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    files = [CONFIG_FILE, TENSORS_FILE] + ([METRICS_FILE] if metrics is not None else [])
    card = model_card(config, metrics, repo_id, (folder / TENSORS_FILE).stat().st_size)

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(repo_id, repo_id, revision, PUSH_LOGIN_HINT):
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        present = api.list_repo_files(repo_id, revision=revision)
        commit = api.create_commit(
            repo_id,
            _operations(folder, files, card, present),
            commit_message=f"microtune: {config['method']} on {config['task']['name']}",
            revision=revision,
        )
    return {
        "repo": repo_id,
        "url": str(url),
        "revision": revision or "main",
        "commit": commit.oid,
        "commit_url": commit.commit_url,
        "files": [*files, README_FILE],
    }


def _checked_push(folder: Path, repo_id: str) -> dict[str, Any]:
    """The artifact's config, once the folder is complete and the push can be made."""
    if not folder.is_dir():
        raise MicrotuneError(
            f"--artifact {folder} is not a folder; pass the folder `microtune train --output` wrote"
        )
    config = read_artifact_config(folder)
    read_artifact_tensors(folder, config)  # present, the hash the config names, valid
    parsed = parse_hub_id(repo_id)
    if parsed is None or parsed[1] is not None:
        raise MicrotuneError(
            f"--repo '{repo_id}' is not a hub repo id; use owner/name (a branch goes in --revision)"
        )
    if is_offline():
        raise MicrotuneError(
            "cannot push: the hub is offline (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE "
            "and run again with a network"
        )
    return config


def _operations(folder: Path, files: list[str], card: str, present: list[str]) -> list:
    """The commit: the artifact's files and the card, less a stale run's metrics.json."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files
    ]
    operations.append(CommitOperationAdd(README_FILE, card.encode("utf-8")))
    if METRICS_FILE in present and METRICS_FILE not in files:
        operations.append(CommitOperationDelete(METRICS_FILE))  # a stale run's numbers
    return operations


def model_card(
    config: dict[str, Any], metrics: dict[str, Any] | None, repo_id: str, tensor_bytes: int
) -> str:
    """The README.md pushed beside an artifact: hub metadata, what it is, how to load it."""
    base = config["base_model"]
    base_is_hub_id = parse_hub_id(base["name"]) is not None and not Path(base["name"]).exists()
    task = config["task"]
    method = config["method"]
    if base_is_hub_id:
        base_text = f"[`{base['name']}`](https://huggingface.co/{base['name']})"
    else:
        base_text = f"a local model folder (`{base['name']}`): pass `model=` or `--model` with it"
    rows = _card_rows(config, metrics, base_text, tensor_bytes)
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    example = '"an example text"' if len(task["text_columns"]) == 1 else '("first", "second")'
    merge_line = (
        'model.save_pretrained("merged")  # folded into the base weights: a transformers folder\n'
        if method_class(method).mergeable
        else ""
    )
    return f"""---
{_card_metadata(config, base_is_hub_id)}
---

# {repo_id.split("/")[1]}

A microtune artifact: `{method}` fine-tuning of the base model below for `{task["name"]}`.
It holds only the trained tensors and their config; microtune applies them to the base model
after checking the base weights' fingerprint.

| | |
|---|---|
{table}

## Use

```python
import microtune

model = microtune.load("{repo_id}")  # fetches this repo and the base model
model.predict([{example}])  # [{{"label": ..., "score": ...}}]
{merge_line}```

From the shell: `microtune predict --artifact {repo_id} --input texts.txt`.

Written by microtune {config.get("library_version", "")}.
"""


def _card_metadata(config: dict[str, Any], base_is_hub_id: bool) -> str:
    """The card's hub metadata (YAML): base model, library, pipeline and tags."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=config["base_model"]["name"] if base_is_hub_id else None,
        library_name="microtune",
        pipeline_tag="text-classification",
        tags=["microtune", config["method"], config["task"]["name"]],
    ).to_yaml()


def _card_rows(
    config: dict[str, Any], metrics: dict[str, Any] | None, base_text: str, tensor_bytes: int
) -> list[tuple[str, str]]:
    """The model card's table: base model, method, task, sizes, dev metrics, privacy."""
    base, task, method = config["base_model"], config["task"], config["method"]
    labels = ", ".join(task.get("label_names") or []) or f"{task['num_labels']} outputs"
    parameters = config.get("parameters", {})
    rows = [
        ("base model", f"{base_text} ({base['model_type']}, fingerprint `{base['fingerprint']}`)"),
        ("method", f"`{method}` `{json.dumps(config['method_config'], sort_keys=True)}`"),
        ("task", f"`{task['name']}`: {labels}; text columns {', '.join(task['text_columns'])}"),
        (
            "size",
            f"{parameters.get('trained', '?')} trained numbers, "
            f"{parameters.get('stored', '?')} stored; adapter.safetensors {tensor_bytes} bytes",
        ),
    ]
    if metrics is not None:
        values = metrics.get("metrics") or {}
        shown = ", ".join(
            f"{key} {value:.4f}" for key, value in values.items() if isinstance(value, float)
        )
        rows.append(("dev metrics", f"{shown} after {metrics.get('steps', '?')} steps"))
    # The privacy claim comes from microtune.json's record, which config_sha256 covers, never
    # from metrics.json, which no hash covers (issue 23).
    privacy = config.get("privacy")
    if privacy is not None:
        rows.append(
            (
                "privacy",
                f"DP-SGD, ε = {privacy['epsilon']}, δ = {privacy['delta']} (σ {privacy['sigma']}, "
                f"clip {privacy['clip']}, {privacy['steps']} steps)",
            )
        )
    return rows
