"""Exports: the merged model as a standard folder that plain `transformers` (or `peft`) loads,
written atomically beside its destination, and the check that it computes what the unmerged
artifact computes.

Formats, so that no folder loads silently wrong in a stock loader: a stock task class where the
task type finds one that computes the same function (`TaskType.export_stock`); else a
sentence-transformers folder for mean- or first-token-pooled sentence tasks
(`microtune.export.sentence`); else "backbone+head": the backbone in `backbone/` and the head in
`head.safetensors`, with no `config.json` in the root, so that `pipeline()` and the Auto classes
fail loudly (only microtune computes that read-out). `--format onnx` writes one ONNX graph
(`microtune.export.onnx`); the "peft+head" format of `microtune.export.peft` loads here too
(`load_exported`). Each export's record says what loads it ("loads_with").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from microtune.artifacts import folders
from microtune.artifacts.store import load_artifact, read_artifact_config, read_export_record
from microtune.backbone.load import fingerprint, load_backbone
from microtune.common.files import EXPORT_FILE, HEAD_FILE, write_json, write_tensors
from microtune.common.manifest import check_export_files, seal_record
from microtune.errors import MicrotuneError
from microtune.export.onnx import ONNX_FORMAT, load_onnx, write_onnx
from microtune.export.sentence import (
    ST_FORMAT,
    load_sentence_transformer,
    sentence_transformers_fits,
    write_sentence_transformer,
)
from microtune.methods import method_class
from microtune.model import TaskModel
from microtune.tasks.data import batches
from microtune.tasks.examples import load_split, task_from_record
from microtune.tasks.heads import read_out
from microtune.tasks.inference import Outputs, join_outputs, predict
from microtune.tasks.types import stock_classes, type_of
from microtune.version import __version__

# The format of a LoRA artifact exported for `peft` (`microtune.export.peft`).
PEFT_FORMAT = "peft+head"
BACKBONE_HEAD_FORMAT = "backbone+head"
# Where a "backbone+head" export keeps its backbone: out of the root, so that no stock loader
# finds a config.json there and builds a random head over it (older exports: the root).
BACKBONE_FOLDER = "backbone"
# What loads each format, for the export's record ("loads_with") and the README.
LOADS_WITH = {
    "sequence-classification": "transformers: AutoModelForSequenceClassification, "
    "pipeline('text-classification')",
    "token-classification": "transformers: AutoModelForTokenClassification, "
    "pipeline('token-classification')",
    "causal-lm": "transformers: AutoModelForCausalLM, pipeline('text-generation')",
    ST_FORMAT: "sentence_transformers.SentenceTransformer(folder).encode(texts) -> logits",
    ONNX_FORMAT: "onnxruntime.InferenceSession(folder/model.onnx) -> logits; label names in "
    "its metadata",
    BACKBONE_HEAD_FORMAT: "microtune predict --model-folder / microtune.load only: no stock "
    "class computes this read-out, so stock loaders find no config.json and fail",
    PEFT_FORMAT: "peft: PeftModel.from_pretrained over the base model, plus head.safetensors "
    "(microtune predict --model-folder)",
}


def export_merged(
    task_model: TaskModel,
    tokenizer,
    config: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected: list[tuple[str, str | os.PathLike]] | None = None,
    onnx: bool = False,
    quantize: str | None = None,
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
        return write_merged(task_model, tokenizer, config, staging, onnx=onnx, quantize=quantize)


def write_merged(
    task_model: TaskModel,
    tokenizer,
    config: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    onnx: bool = False,
    quantize: str | None = None,
) -> str:
    """Write a merged task model as a standard model folder; returns the format written.

    A stock `transformers` task class where the task type finds one that computes the same
    function (`TaskType.export_stock`): "sequence-classification" (BERT with the pooler
    read-out, decoders with the last-token read-out and a bias-free head) loads with
    `AutoModelForSequenceClassification`, "token-classification" with
    `AutoModelForTokenClassification`. Otherwise a sentence-transformers folder where its
    Pooling computes the read-out, else "backbone+head": `backbone/` holds the backbone and
    `head.safetensors` the linear head over the read-out named in microtune_export.json.
    With `onnx`, one ONNX graph of the whole task model (int8 weights with `quantize`).
    """
    if task_model.method is not None:
        task_model.merge()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task_type = task_model.task_type
    tokenizer.save_pretrained(output_dir)  # first: a stock export checks how it pads
    if onnx:
        metadata = export_record(task_model, config, ONNX_FORMAT, quantize)
        metadata["labels"] = label_names(config, metadata)
        write_onnx(task_model, output_dir, metadata, quantize)
        export_format = ONNX_FORMAT
    elif task_type.stock_format and task_type.export_stock(task_model, config, output_dir):
        export_format = task_type.stock_format
    elif sentence_transformers_fits(task_model):
        card = export_card(config, ST_FORMAT, task_model.head_config.num_labels)
        max_length = config.get("max_length")
        write_sentence_transformer(task_model, tokenizer, max_length, output_dir, card)
        export_format = ST_FORMAT
    else:
        (output_dir / BACKBONE_FOLDER).mkdir(exist_ok=True)
        task_model.backbone.save_pretrained(output_dir / BACKBONE_FOLDER)
        write_head(task_model, output_dir)
        export_format = BACKBONE_HEAD_FORMAT
    write_export_record(task_model, config, output_dir, export_format, quantize)
    return export_format


def write_head(task_model: TaskModel, output_dir: str | os.PathLike) -> None:
    """`head.safetensors`: the linear head that goes beside an exported backbone."""
    write_tensors(Path(output_dir) / HEAD_FILE, task_model.head.linear.state_dict())


def export_record(
    task_model: TaskModel, config: dict[str, Any], export_format: str, quantize: str | None = None
) -> dict[str, Any]:
    """`microtune_export.json`: what loads the folder, and how to turn its outputs into
    logits and labels (`predict --model-folder` encodes inputs as training did)."""
    head = task_model.head_config
    return {
        "format": export_format,
        "loads_with": LOADS_WITH.get(export_format, "microtune predict --model-folder"),
        "quantize": quantize,
        "readout": head.readout,
        "num_labels": head.num_labels,
        "mask_token_id": task_model.mask_token_id,
        "max_length": config.get("max_length"),
        "task": config["task"],
        "method": config["method"],
        "base_model": config["base_model"],
        "library_version": __version__,
    }


def write_export_record(
    task_model: TaskModel,
    config: dict[str, Any],
    output_dir: str | os.PathLike,
    export_format: str,
    quantize: str | None = None,
) -> None:
    """Write `export_record` into the folder, last: every export's, peft's included
    (`read_export_record` reads it back), with the hash of every file the folder now holds
    (`common.manifest`: checked before the folder loads, read by --overwrite)."""
    record = export_record(task_model, config, export_format, quantize)
    write_json(Path(output_dir) / EXPORT_FILE, seal_record(record, output_dir))


def label_names(config: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The task's label names, else LABEL_0, LABEL_1, ... (as transformers names them)."""
    names = list(config["task"].get("label_names") or [])
    count = record["num_labels"]
    return names if len(names) == count else [f"LABEL_{i}" for i in range(count)]


def export_card(config: dict[str, Any], export_format: str, num_labels: int) -> str:
    """The README.md of an export that no stock class describes: what loads it, and its
    label names (in output order)."""
    names = label_names(config, {"num_labels": num_labels})
    return (
        f"# {config['task']['name']} ({config['method']}, merged by microtune {__version__})\n\n"
        f"Loads with {LOADS_WITH[export_format]}.\n\n"
        f"Outputs, in order: {', '.join(names)}.\n"
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
    A "peft+head" folder (`microtune.export.peft`) loads with peft over `base_model` (default:
    the base model it names). Every file is first checked against the hash the export recorded
    (`common.manifest.check_export_files`): a replaced or edited file is refused in one line.
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModel

    folder = Path(folder)
    info = read_export_record(folder)
    check_export_files(folder, info)
    stock = stock_classes()
    if info["format"] in stock:
        auto_class = getattr(transformers, stock[info["format"]])
        model = auto_class.from_pretrained(folder).eval()
        return lambda **inputs: model(**inputs).logits, model
    if info["format"] == ST_FORMAT:
        return load_sentence_transformer(folder)
    if info["format"] == ONNX_FORMAT:
        return load_onnx(folder)
    if info["format"] == PEFT_FORMAT:
        backbone = load_peft(folder, base_model)
    else:  # exports before the backbone moved out of the root keep it there
        inner = folder / BACKBONE_FOLDER
        backbone = AutoModel.from_pretrained(inner if inner.is_dir() else folder).eval()
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
        tokenizer, dev, config["max_length"], config["head"]["readout"]
    )
    return rows


# The export check's bound on max |logit difference|, relative to the largest |logit| (at
# least 1): a float32 merge differs by rounding alone; a half-precision base rounds the folded
# weights to its own precision.
EXPORT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
# int8 weights (`--quantize int8`) round every linear layer: a looser bound on the logits, and
# the share of rows whose argmax must stay put (a classification's predictions).
INT8_TOLERANCE, INT8_SAME_LABEL = 0.5, 0.9


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


def check_int8(exported: Outputs, unmerged: Outputs, output_dir: str | os.PathLike) -> float:
    """Fail the check of an int8 export that moved the logits or the predicted labels more
    than quantisation does (`INT8_TOLERANCE`, `INT8_SAME_LABEL`); returns the label share."""
    diff, largest = logit_difference(exported, unmerged)
    scale = max(1.0, float(abs(largest).max()))
    flat = [np.concatenate(x) if isinstance(x, list) else x for x in (exported, unmerged)]
    width = flat[0].shape[-1] if flat[0].size else 1
    same = (
        1.0
        if width == 1 or not flat[0].size
        else float((flat[0].argmax(-1) == flat[1].argmax(-1)).mean())
    )
    if not (diff <= INT8_TOLERANCE * scale and same >= INT8_SAME_LABEL):
        raise MicrotuneError(
            f"export check failed: the int8 model moves the logits by up to {diff:.3g} and keeps "
            f"{same:.1%} of the labels; nothing written to {output_dir}: export without "
            "--quantize"
        )
    return same


def _check_export_options(examples: int, onnx: bool, quantize: str | None) -> None:
    if examples < 1:
        raise MicrotuneError(f"--check-examples must be at least 1, got {examples}")
    if quantize is not None and not onnx:
        raise MicrotuneError("--quantize applies to --format onnx")


def export_and_check(
    artifact_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: str | None = None,
    data_dir: str | None = None,
    examples: int = 256,
    overwrite: bool = False,
    data_file: str | None = None,
    onnx: bool = False,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Merge and export, then reload the folder as a deployment does (its stock class,
    sentence-transformers, onnxruntime) and compare against the unmerged artifact on dev
    examples (of `data_file` for tasks on the user's own files): max |logit difference|, and
    inference time of the export against the base model, timed side by side. The folder is
    checked while staged, so a folder that fails the check is never published."""
    _check_export_options(examples, onnx, quantize)
    stored = read_artifact_config(artifact_dir)
    protected = folders.export_protected(stored, artifact_dir, model)
    folders.check_model_folder(output_dir, overwrite=overwrite, protected=protected)  # early
    method_class(stored["method"]).require_mergeable()
    unmerged, tokenizer, config = load_artifact(artifact_dir, model)
    rows = check_rows(tokenizer, config, data_dir, examples, data_file)
    unmerged_logits = predict(unmerged, rows, tokenizer.pad_token_id)
    dtype = config["base_model"].get("dtype", "float32")
    protected = [
        *folders.export_protected(config, model=getattr(unmerged.backbone, "name_or_path", None)),
        *protected,
    ]
    inputs = [b for b, _ in batches(rows, [0] * len(rows), 64, tokenizer.pad_token_id)]
    report: dict[str, Any] = {"output": str(output_dir)}
    with folders.model_folder(output_dir, overwrite=overwrite, protected=protected) as staging:
        report["format"] = write_merged(
            unmerged, tokenizer, config, staging, onnx=onnx, quantize=quantize
        )
        exported_logits_fn, exported = load_exported(staging)
        with torch.no_grad():
            exported_logits = join_outputs([exported_logits_fn(**b).float() for b in inputs], rows)
        diff, largest = logit_difference(exported_logits, unmerged_logits)
        if quantize:
            report["same_label_share"] = check_int8(exported_logits, unmerged_logits, output_dir)
        else:
            check_logit_diff(diff, largest, dtype, output_dir)
        report |= {"examples": len(rows), "max_abs_logit_diff": diff}
        base = (model or config["base_model"]["name"], dtype)
        report |= time_against_base(exported_logits_fn, exported, base, inputs)
    return report


def time_against_base(exported_fn, exported, base: tuple[str, str], inputs: list) -> dict[str, Any]:
    """Parameters and inference time of the export against the base model, interleaved so both
    see the same machine state; backbones only where the export holds a `transformers` model
    (the head is one matmul), else the export's whole forward (ONNX Runtime)."""
    base_model, _ = load_backbone(*base)  # (name, dtype)
    base_model.eval()
    if isinstance(exported, torch.nn.Sequential):  # sentence-transformers: its Transformer
        exported = exported[0].auto_model
    if isinstance(exported, PreTrainedModel):
        plain = getattr(exported, exported.base_model_prefix, exported)
        forward, merged_params = plain, sum(p.numel() for p in plain.parameters())
    else:
        forward = exported_fn
        is_torch = isinstance(exported, torch.nn.Module)  # else an onnxruntime session
        merged_params = sum(p.numel() for p in exported.parameters()) if is_torch else None
    base_s, merged_s = [], []
    for _ in range(3):
        base_s.append(time_forward(base_model, inputs, 1))
        merged_s.append(time_forward(forward, inputs, 1))
    return {
        "base_parameters": sum(p.numel() for p in base_model.parameters()),
        "merged_parameters": merged_params,
        "base_forward_s": round(min(base_s), 4),
        "merged_forward_s": round(min(merged_s), 4),
        "merged_over_base_time": round(min(merged_s) / min(base_s), 3),
    }


def load_peft(folder: str | os.PathLike, base_model: str | None = None):
    """The exported folder's backbone as peft serves it: `PeftModel.from_pretrained` over the
    base model (default: the one the export names; its weights must match the fingerprint)."""
    try:
        import peft.mapping
        from peft import PeftModel
    except ImportError:
        raise MicrotuneError(
            "loading a peft export needs peft: pip install 'microtune[peft]'"
        ) from None
    info = read_export_record(folder)
    name = base_model or info["base_model"]["name"]
    # In the precision the artifact was trained in (older exports: float32).
    backbone, _ = load_backbone(name, info["base_model"].get("dtype", "float32"))
    if fingerprint(backbone) != info["base_model"]["fingerprint"]:
        raise MicrotuneError(
            f"base model mismatch: {folder} was exported from '{info['base_model']['name']}' "
            f"but '{name}' has other weights; pass the original base model"
        )
    adapter = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    kind = adapter.get("peft_type", "")
    if kind.startswith("MICROTUNE_") and kind not in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise MicrotuneError(
            f"{folder} holds a microtune {info['method']} adapter, which peft knows only once "
            "microtune's methods are registered; import microtune.peft first"
        )
    return PeftModel.from_pretrained(backbone, str(folder)).eval()
