"""Exports: the merged model as a standard folder that plain `transformers` (or `peft`) loads,
written atomically beside its destination, and the check that it computes what the unmerged
artifact computes.

Formats: a stock task class where the task type finds one that computes the same function
(`TaskType.export_stock`), else "backbone+head" (`AutoModel` plus `head.safetensors`); the
"peft+head" format of `microtune.peft_format` loads here too (`load_exported`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtune import folders
from microtune.artifact import load_artifact, read_artifact_config
from microtune.backbone import fingerprint, load_backbone
from microtune.data import batches
from microtune.errors import MicrotuneError
from microtune.files import EXPORT_FILE, HEAD_FILE, write_json, write_tensors
from microtune.heads import read_out
from microtune.inference import Outputs, join_outputs, predict
from microtune.methods import method_class
from microtune.model import TaskModel
from microtune.tasks import load_split, task_from_record
from microtune.tasktypes import stock_classes, type_of
from microtune.version import __version__

# The format of a LoRA artifact exported for `peft` (`microtune.peft_format`).
PEFT_FORMAT = "peft+head"


def export_merged(
    task_model: TaskModel,
    tokenizer,
    config: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected: list[tuple[str, str | os.PathLike]] | None = None,
) -> str:
    """Merge and write the standard model folder (`write_merged`); returns the format written.

    The folder is built beside `output_dir` and moved into place once complete
    (`folders.model_folder`): the base model's folder and the `protected` (what, path) folders
    are refused, and a folder that is not empty is replaced only with `overwrite`."""
    protected = [
        *folders.export_protected(config, model=getattr(task_model.backbone, "name_or_path", None)),
        *(protected or []),
    ]
    with folders.model_folder(output_dir, overwrite=overwrite, protected=protected) as staging:
        return write_merged(task_model, tokenizer, config, staging)


def write_merged(
    task_model: TaskModel, tokenizer, config: dict[str, Any], output_dir: str | os.PathLike
) -> str:
    """Write a merged task model as a standard model folder; returns the format written.

    A stock `transformers` task class where the task type finds one that computes the same
    function (`TaskType.export_stock`): "sequence-classification" (BERT with the pooler
    read-out, decoders with the last-token read-out and a bias-free head) loads with
    `AutoModelForSequenceClassification`, "token-classification" with
    `AutoModelForTokenClassification`. Otherwise "backbone+head": `AutoModel` loads the
    backbone and `head.safetensors` holds the linear head over the read-out named in
    microtune_export.json.
    """
    if task_model.method is not None:
        task_model.merge()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task_type = task_model.task_type
    tokenizer.save_pretrained(output_dir)  # first: a stock export checks how it pads
    if task_type.stock_format and task_type.export_stock(task_model, config, output_dir):
        export_format = task_type.stock_format
    else:
        task_model.backbone.save_pretrained(output_dir)
        write_head(task_model, output_dir)
        export_format = "backbone+head"
    write_export_record(task_model, config, output_dir, export_format)
    return export_format


def write_head(task_model: TaskModel, output_dir: str | os.PathLike) -> None:
    """`head.safetensors`: the linear head that goes beside an exported backbone."""
    write_tensors(Path(output_dir) / HEAD_FILE, task_model.head.linear.state_dict())


def write_export_record(
    task_model: TaskModel, config: dict[str, Any], output_dir: str | os.PathLike, export_format: str
) -> None:
    """`microtune_export.json`: how to turn the exported folder's outputs into logits."""
    head = task_model.head_config
    write_json(
        Path(output_dir) / EXPORT_FILE,
        {
            "format": export_format,
            "readout": head.readout,
            "num_labels": head.num_labels,
            "mask_token_id": task_model.mask_token_id,
            "task": config["task"],
            "method": config["method"],
            "base_model": config["base_model"],
            "library_version": __version__,
        },
    )


def merge_artifact(
    artifact_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Load an artifact, fold it into the base weights, and write the export folder (a folder
    that is not empty is replaced only with `overwrite`; see `export_merged`)."""
    stored = read_artifact_config(artifact_dir)
    protected = folders.export_protected(stored, artifact_dir, model)
    folders.check_model_folder(output_dir, overwrite=overwrite, protected=protected)  # early
    method_class(stored["method"]).require_mergeable()
    task_model, tokenizer, config = load_artifact(artifact_dir, model)
    export_format = export_merged(
        task_model, tokenizer, config, output_dir, overwrite=overwrite, protected=protected
    )
    return {
        "output": str(output_dir),
        "format": export_format,
        "parameters": sum(p.numel() for p in task_model.backbone.parameters()),
    }


def load_exported(folder: str | os.PathLike, base_model: str | None = None):
    """Load an export folder with plain transformers; returns a function inputs -> logits.

    This is what a deployment does (the README shows the same few lines without microtune).
    A "peft+head" folder (`microtune.peft_format`) loads with peft over `base_model` (default:
    the base model it names).
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModel

    folder = Path(folder)
    info = json.loads((folder / EXPORT_FILE).read_text())
    stock = stock_classes()
    if info["format"] in stock:
        auto_class = getattr(transformers, stock[info["format"]])
        model = auto_class.from_pretrained(folder).eval()
        return lambda **inputs: model(**inputs).logits, model
    if info["format"] == PEFT_FORMAT:
        backbone = load_peft(folder, base_model)
    else:
        backbone = AutoModel.from_pretrained(folder).eval()
    head = load_file(folder / HEAD_FILE)

    def logits(**inputs):
        out = backbone(**inputs)
        features = read_out(
            info["readout"],
            out.last_hidden_state,
            inputs["attention_mask"],
            inputs["input_ids"],
            info["mask_token_id"],
            getattr(out, "pooler_output", None),
        )
        # The head stays float32 beside a lower-precision backbone; a bias-free head has none.
        logits = features.to(head["weight"].dtype) @ head["weight"].T
        return logits + head["bias"] if "bias" in head else logits

    return logits, backbone


def time_forward(forward, batches_, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds to run every batch once."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for inputs in batches_:
                forward(**inputs)
            best = min(best, time.perf_counter() - start)
    return best


def check_rows(
    tokenizer,
    config: dict[str, Any],
    data_dir: str | None,
    examples: int,
    data_file: str | None = None,
) -> list:
    """The first `examples` dev rows of the artifact's task (or of `data_file`, for tasks on
    the user's own files), encoded as it was trained: what the export checks compare exported
    and unmerged logits on. A task type may cap them (`export_check_examples`: the causal
    LM's logits span its vocabulary at every token)."""
    task_spec = task_from_record(config["task"])
    cap = type_of(task_spec).export_check_examples
    if cap is not None:
        examples = cap if examples is None else min(examples, cap)
    columns = tuple(config["task"]["text_columns"]) if data_file else None
    label = config["task"].get("label_column") if data_file else None
    dev = load_split(
        task_spec, task_spec.dev_split, data_dir, data_file, columns, label, limit=examples
    )
    rows, _ = type_of(task_spec).encode(
        tokenizer, dev, config["max_length"], config["head"]["readout"] == "mask"
    )
    return rows


# The export check's bound on max |logit difference|, relative to the largest |logit| (at
# least 1): a float32 merge differs by rounding alone; a half-precision base rounds the folded
# weights to its own precision.
EXPORT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def logit_difference(a: Outputs, b: Outputs) -> tuple[float, np.ndarray]:
    """(max |a - b|, b's values) over outputs as `predict` returns them (per-row arrays for
    per-token types)."""
    if isinstance(a, list):
        if not a:
            return 0.0, np.zeros(1)
        return max(float(abs(x - y).max()) for x, y in zip(a, b, strict=True)), np.concatenate(
            [y.reshape(-1) for y in b]
        )
    return float(abs(a - b).max()), b


def check_logit_diff(
    diff: float, reference_logits, dtype: str, output_dir: str | os.PathLike
) -> None:
    """Fail the export check when the exported logits differ beyond tolerance (NaN fails)."""
    scale = max(1.0, float(abs(reference_logits).max()))  # max(1.0, nan) is 1.0
    tolerance = EXPORT_TOLERANCE.get(dtype, 5e-2) * scale
    if not diff <= tolerance:
        raise MicrotuneError(
            f"export check failed: max |logit difference| {diff:.3g} > {tolerance:.3g} between "
            f"{output_dir} and the artifact; do not use that folder (is the artifact finite?)"
        )


def export_and_check(
    artifact_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: str | None = None,
    data_dir: str | None = None,
    examples: int = 256,
    overwrite: bool = False,
    data_file: str | None = None,
) -> dict[str, Any]:
    """Merge and export, then reload with plain transformers and compare against the unmerged
    artifact on dev examples (of `data_file` for tasks on the user's own files): max |logit
    difference|, and inference time of the merged model against the base model, timed side by
    side. The output folder as in `merge_artifact`."""
    if examples < 1:
        raise MicrotuneError(f"--check-examples must be at least 1, got {examples}")
    protected = folders.export_protected(read_artifact_config(artifact_dir), artifact_dir, model)
    folders.check_model_folder(output_dir, overwrite=overwrite, protected=protected)  # early
    method_class(read_artifact_config(artifact_dir)["method"]).require_mergeable()
    unmerged, tokenizer, config = load_artifact(artifact_dir, model)
    rows = check_rows(tokenizer, config, data_dir, examples, data_file)
    unmerged_logits = predict(unmerged, rows, tokenizer.pad_token_id)
    export_format = export_merged(
        unmerged, tokenizer, config, output_dir, overwrite=overwrite, protected=protected
    )

    exported_logits_fn, exported_backbone = load_exported(output_dir)
    inputs = [b for b, _ in batches(rows, [0] * len(rows), 64, tokenizer.pad_token_id)]
    with torch.no_grad():
        exported_logits = join_outputs([exported_logits_fn(**b).float() for b in inputs], rows)
    diff, largest = logit_difference(exported_logits, unmerged_logits)
    check_logit_diff(diff, largest, config["base_model"].get("dtype", "float32"), output_dir)
    base, _ = load_backbone(
        model or config["base_model"]["name"], config["base_model"].get("dtype", "float32")
    )
    base.eval()
    plain = getattr(exported_backbone, exported_backbone.base_model_prefix, exported_backbone)
    # Interleave so both see the same machine state; backbones only (the head is one matmul).
    base_s, merged_s = [], []
    for _ in range(3):
        base_s.append(time_forward(base, inputs, 1))
        merged_s.append(time_forward(plain, inputs, 1))
    base_params = sum(p.numel() for p in base.parameters())
    merged_params = sum(p.numel() for p in plain.parameters())
    return {
        "output": str(output_dir),
        "format": export_format,
        "examples": len(rows),
        "max_abs_logit_diff": diff,
        "base_parameters": base_params,
        "merged_parameters": merged_params,
        "base_forward_s": round(min(base_s), 4),
        "merged_forward_s": round(min(merged_s), 4),
        "merged_over_base_time": round(min(merged_s) / min(base_s), 3),
    }


def load_peft(folder: str | os.PathLike, base_model: str | None = None):
    """The exported folder's backbone as peft serves it: `PeftModel.from_pretrained` over the
    base model (default: the one the export names; its weights must match the fingerprint)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise MicrotuneError(
            "loading a peft export needs peft: pip install 'microtune[peft]'"
        ) from None
    info = json.loads((Path(folder) / EXPORT_FILE).read_text())
    name = base_model or info["base_model"]["name"]
    # In the precision the artifact was trained in (older exports: float32).
    backbone, _ = load_backbone(name, info["base_model"].get("dtype", "float32"))
    if fingerprint(backbone) != info["base_model"]["fingerprint"]:
        raise MicrotuneError(
            f"base model mismatch: {folder} was exported from '{info['base_model']['name']}' "
            f"but '{name}' has other weights; pass the original base model"
        )
    return PeftModel.from_pretrained(backbone, str(folder)).eval()
