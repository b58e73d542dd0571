"""The library's front door: train, evaluate, merge and export, as plain functions.

The CLI is a thin layer over these; notebooks and scripts call them directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtune import __version__, folders
from microtune.arch import arch_for
from microtune.artifact import (
    artifact_bytes,
    fingerprint,
    load_artifact,
    read_artifact_config,
    save_artifact,
    write_json,
    write_tensors,
)
from microtune.errors import MicrotuneError
from microtune.hub import resolve_artifact
from microtune.methods import build_method, method_class
from microtune.model import DEFAULT_MODEL, HeadConfig, TaskModel, load_backbone
from microtune.privacy import DPConfig, private_plugins
from microtune.tasks import (
    TASKS,
    Example,
    Task,
    get_task,
    load_examples,
    load_rows,
    rows_to_examples,
    with_data_labels,
)
from microtune.tasktypes import STOCK_CLASSES, Outputs, task_type_of
from microtune.train import (
    DEFAULT_MAX_STEPS,
    TrainConfig,
    Trainer,
    TrainerCallback,
    evaluate,
    join_outputs,
    predict,
)

METRICS_FILE = "metrics.json"
HEAD_FILE = "head.safetensors"
EXPORT_FILE = "microtune_export.json"


def default_readout(model_type_is_causal: bool) -> str:
    """Mean pooling for encoders (what sentence encoders such as MiniLM were trained for), the
    last token for decoders (the only one that has seen the whole sequence)."""
    return "last" if model_type_is_causal else "mean"


def resolve_device(device: str) -> torch.device:
    """ "auto" is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MicrotuneError(
            f"device '{device}' is not a torch device; use auto, cpu or cuda"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MicrotuneError("--device cuda: no GPU is visible to torch; use --device cpu")
    return resolved


def task_record(
    task: Task, text_columns: tuple[str, ...] | None = None, label_column: str | None = None
) -> dict[str, Any]:
    """The task as an artifact stores it, with the columns its training data used."""
    return {
        "name": task.name,
        "type": task.type,
        "num_labels": task.num_labels,
        "metrics": list(task.metrics),
        "text_columns": list(text_columns or task.text_columns),
        "label_column": label_column or task.label_column,
        "label_names": list(task.label_names),
        "dev_split": task.dev_split,
    }


def task_from_record(record: dict[str, Any]) -> Task:
    """The registered task of that name (with its hub source), else one rebuilt from the record.

    The record comes from a schema-checked artifact (`microtune.schema`: its name and dev split
    cannot be paths); a registered name must also agree with the registry on the labels."""
    if record["name"] in TASKS:
        task = get_task(record["name"])
        if task.labels_from_data:  # the label set the training data gave, in its order
            task = dataclasses.replace(
                task, num_labels=record["num_labels"], label_names=tuple(record["label_names"])
            )
        if task.num_labels != record["num_labels"]:
            raise MicrotuneError(
                f"the artifact's task '{task.name}' has {record['num_labels']} labels but the "
                f"registered task has {task.num_labels}; re-train or restore the artifact"
            )
        # The shape its training data had (causal LM: prompt/response or text).
        return task.task_type.fit_rows(task, [], tuple(record["text_columns"]))
    return Task(
        record["name"],
        tuple(record["text_columns"]),
        record["num_labels"],
        tuple(record["metrics"]),
        record["dev_split"],
        tuple(record["label_names"]),
        type=task_type_of(record).name,
        label_column=record.get("label_column", "label"),
    )


def check_max_length(backbone, max_length: int) -> None:
    """--max-length must leave room for special tokens and fit the position table."""
    # RoBERTa-style tables start after the padding index, so keep two positions in reserve.
    limit = getattr(backbone.config, "max_position_embeddings", None)
    upper = limit - 2 if limit else None
    if max_length < 8 or (upper is not None and max_length > upper):
        raise MicrotuneError(
            f"--max-length {max_length} is out of range for this model; use 8 to {upper or 'any'}"
        )


def load_split(
    task: Task,
    split: str,
    data_dir=None,
    data_file=None,
    text_columns=None,
    label_column: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    examples = load_examples(task, split, data_dir, data_file, text_columns, label_column)
    return examples if limit is None else examples[:limit]


def train(
    task: str,
    method: str,
    output_dir: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    method_options: dict[str, Any] | None = None,
    readout: str | None = None,
    head_dropout: float = 0.0,
    head_bias: bool | None = None,
    train_config: TrainConfig | None = None,
    data_dir: str | None = None,
    train_file: str | None = None,
    dev_file: str | None = None,
    text_columns: tuple[str, ...] | None = None,
    label_column: str | None = None,
    labels: tuple[str, ...] | None = None,
    max_length: int = 128,
    max_train_examples: int | None = None,
    resume: bool = False,
    device: str = "auto",
    privacy: DPConfig | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Train one method on one task; writes the artifact and metrics.json into output_dir.

    The folder is locked while the run lasts, and one holding files microtune did not write,
    another run's artifact or an unfinished run's checkpoint is refused unless `resume` (the
    checkpoint) or `overwrite` says what to do with them (`microtune.folders`).

    `dtype` ("float32", "bfloat16", "float16") is the precision of the frozen base; what
    trains (and the head) stays float32, and the artifact records the base's precision.

    With `privacy`, training is DP-SGD (`microtune.privacy`): ε spent is metrics.json's
    `epsilon`, and both metrics.json and the artifact carry the full "privacy" record.

    Tasks whose labels come from the data (`classification`, `token-classification`,
    `conll2003`) read the label set from the training rows, in the task type's order unless
    `labels` fixes it; the artifact records the names.

    `head_bias` None is the task type's default (`TaskType.default_head_bias`: no bias on a
    decoder's last-token sentence head, so that it exports as the stock class).

    `callbacks` (`train.TrainerCallback`) watch or steer the loop beside the built-in ones
    (`microtune bench` times each step with one)."""
    started = time.time()
    task_spec = get_task(task)
    config = train_config or TrainConfig(max_steps=DEFAULT_MAX_STEPS)
    if (train_file is None) != (dev_file is None):
        raise MicrotuneError("give --train-file and --dev-file together (or --data-dir)")
    if max_train_examples is not None and max_train_examples < 1:
        raise MicrotuneError(f"--max-train-examples must be at least 1, got {max_train_examples}")
    if os.path.isdir(model):
        model = os.path.abspath(model)  # the artifact must find it from anywhere
    with folders.training_folder(
        output_dir,
        resume=resume,
        overwrite=overwrite,
        protected=folders.base_model_folders([model]),
    ) as output_dir:
        train_rows_raw, source = load_rows(task_spec, "train", data_dir, train_file)
        if max_train_examples is not None:
            train_rows_raw = train_rows_raw[:max_train_examples]
        if task_spec.labels_from_data:
            task_spec = with_data_labels(task_spec, train_rows_raw, source, label_column, labels)
        elif labels:
            raise MicrotuneError(
                f"--labels applies to tasks that read their labels from the data, not to "
                f"{task_spec.name}"
            )
        task_spec = task_spec.task_type.fit_rows(task_spec, train_rows_raw, text_columns)
        train_examples = rows_to_examples(
            task_spec, train_rows_raw, source, text_columns, label_column
        )
        dev_examples = load_split(
            task_spec, task_spec.dev_split, data_dir, dev_file, text_columns, label_column
        )
        task_type = task_spec.task_type

        torch.manual_seed(config.seed)
        backbone, tokenizer = load_backbone(model, dtype, task_type.auto_class)
        check_max_length(backbone, max_length)
        base_fingerprint = fingerprint(backbone)
        method_obj = build_method(method, method_options)
        if config.learning_rate is None:
            config = dataclasses.replace(config, learning_rate=method_obj.default_learning_rate)

        causal = arch_for(backbone).causal
        chosen_readout = task_type.readout(readout, default_readout(causal))
        head_config = HeadConfig(
            num_labels=task_spec.num_labels,
            readout=chosen_readout,
            head_dropout=head_dropout,
            bias=task_type.default_head_bias(chosen_readout, causal)
            if head_bias is None
            else head_bias,
        )
        task_model = TaskModel(
            backbone,
            head_config,
            method_obj,
            mask_token_id=tokenizer.mask_token_id,
            task_type=task_type,
        )
        task_model.to(resolve_device(device))
        if not task_model.count_trainable()["total"]:
            raise MicrotuneError(
                f"nothing trains: method '{method}' adds no tensors of its own and the "
                f"{task_type.name} task keeps the base model's head frozen; choose another method"
            )

        with_mask = head_config.readout == "mask"
        train_rows, train_labels = task_type.encode(
            tokenizer, train_examples, max_length, with_mask
        )
        dev_rows, dev_labels = task_type.encode(tokenizer, dev_examples, max_length, with_mask)
        plugins: dict[str, Any] = {}
        if privacy is not None:
            plan, sampler, step, private_callbacks = private_plugins(
                privacy, task_model, config, len(train_rows)
            )
            plugins = {"sampler": sampler, "step": step, "callbacks": private_callbacks}
        plugins["callbacks"] = [*plugins.get("callbacks", ()), *callbacks]
        trainer = Trainer(
            task_model,
            config,
            train_rows,
            train_labels,
            tokenizer.pad_token_id,
            output_dir,
            evaluate_fn=lambda m: evaluate(
                m,
                task_spec,
                dev_rows,
                dev_labels,
                tokenizer.pad_token_id,
                config.eval_batch_size,
                tokenizer,
            ),
            main_metric=task_spec.main_metric,
            run_signature={
                "model": model,
                "base_fingerprint": base_fingerprint,
                "method": method,
                "method_config": method_obj.config.to_dict(),
                "head": dataclasses.asdict(head_config),
                "task": task_record(task_spec, text_columns, label_column),
                "max_length": max_length,
                "train_examples": len(train_examples),
                "privacy": dataclasses.asdict(privacy) if privacy else None,
            },
            **plugins,
        )
        train_started = time.time()
        dev_metrics = trainer.fit(resume=resume)
        train_seconds = time.time() - train_started
        privacy_record = plan.record(plugins["step"].private_steps) if privacy else None

        size = save_artifact(
            output_dir,
            task_model,
            method_name=method,
            base_model=model,
            base_fingerprint=base_fingerprint,
            task=task_record(task_spec, text_columns, label_column),
            max_length=max_length,
            extra={"privacy": privacy_record} if privacy else None,
            tokenizer=tokenizer,
        )
        trainer.remove_checkpoint()
        report = {
            "task": task_spec.name,
            "method": method,
            "model": model,
            "seed": config.seed,
            "steps": trainer.step,
            "train_examples": len(train_examples),
            "metrics": dev_metrics,
            "trainable_parameters": task_model.count_trainable(),
            "artifact_bytes": size,
            "train_time_s": round(train_seconds, 2),
            "wall_time_s": round(time.time() - started, 2),
            "device": str(next(task_model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "library_version": __version__,
        }
        if privacy is not None:
            report.update(epsilon=privacy_record["epsilon"], privacy=privacy_record)
        write_json(output_dir / METRICS_FILE, report)
    return report


def evaluate_artifact(
    artifact_dir: str | os.PathLike,
    *,
    task: str | None = None,
    split: str | None = None,
    model: str | None = None,
    data_dir: str | None = None,
    data_file: str | None = None,
    text_columns: tuple[str, ...] | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Metrics of a saved artifact on one split (default: the task's dev split).

    Columns default to those the artifact was trained with. Another task than the artifact's
    is refused unless the data is named explicitly (`data_file`): then its labels must still
    fit the head."""
    trained_on = read_artifact_config(artifact_dir)["task"]["name"]
    if task is not None and task != trained_on and data_file is None:
        raise MicrotuneError(
            f"the artifact was trained on '{trained_on}', not '{task}'; leave out --task to "
            f"evaluate on {trained_on}, or evaluate on other data explicitly with --data-file "
            "(and --text-columns, --label-column), whose labels must fit the artifact's head"
        )
    task_model, tokenizer, config = load_artifact(artifact_dir, model)
    own = task is None or task == config["task"]["name"]
    task_spec = task_from_record(config["task"]) if own else get_task(task)
    if own:
        text_columns = text_columns or tuple(config["task"]["text_columns"])
        label_column = label_column or config["task"].get("label_column", "label")
        task_spec = task_spec.task_type.fit_rows(task_spec, [], text_columns)
    if task_spec.type != task_model.task_type.name:
        raise MicrotuneError(
            f"task {task_spec.name} is {task_spec.type} but the artifact was trained for "
            f"{task_model.task_type.name}; evaluate on the task it was trained for"
        )
    if task_spec.num_labels != config["head"]["num_labels"]:
        raise MicrotuneError(
            f"task {task_spec.name} has {task_spec.num_labels} labels but the artifact's head "
            f"has {config['head']['num_labels']}; evaluate on the task it was trained for"
        )
    examples = load_split(
        task_spec,
        split or task_spec.dev_split,
        data_dir,
        data_file,
        text_columns,
        label_column,
    )
    rows, labels = task_spec.task_type.encode(
        tokenizer, examples, config["max_length"], config["head"]["readout"] == "mask"
    )
    return evaluate(
        task_model, task_spec, rows, labels, tokenizer.pad_token_id, batch_size, tokenizer
    )


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


def artifact_summary(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """What `microtune info --artifact` prints: method, sizes, base model, metrics if present."""
    artifact_dir = resolve_artifact(artifact_dir)  # a hub id: its cached folder, fetched once
    config = read_artifact_config(artifact_dir)
    # Checked as every other command checks it (tensor file, names, shapes, dtypes, values,
    # base model and tokenizer), so `info` never describes an artifact the others refuse.
    load_artifact(artifact_dir)
    stored = stored_tensor_summary(artifact_dir)
    summary = {
        "method": config["method"],
        "mergeable": method_class(config["method"]).mergeable,
        "task": config["task"]["name"],
        "readout": config["head"]["readout"],
        "artifact_bytes": artifact_bytes(artifact_dir),
        "base_model": config["base_model"],
        "method_config": config["method_config"],
        "library_version": config["library_version"],
    }
    summary.update(stored)
    # Trained numbers as recorded at save time; older artifacts stored exactly what trained.
    summary["trainable_parameters"] = config.get("parameters", {}).get(
        "trained", stored["stored_parameters"]
    )
    metrics_path = Path(artifact_dir) / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            metrics = None
        if not isinstance(metrics, dict):
            raise MicrotuneError(
                f"{metrics_path} is not a JSON object; re-train, or delete it to see the rest"
            )
        summary["metrics"] = metrics.get("metrics")
    return summary


def stored_tensor_summary(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """Bytes of the artifact's tensor file and the numbers it stores (head and method, as
    `TaskModel.count_stored`), read from the safetensors header alone."""
    from safetensors import safe_open

    from microtune.artifact import TENSORS_FILE

    path = Path(artifact_dir) / TENSORS_FILE
    if not path.is_file():
        raise MicrotuneError(f"{path} is missing; the artifact is incomplete")
    counts = {"head": 0, "method": 0}
    with safe_open(str(path), framework="pt") as tensors:
        for name in tensors.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            numel = math.prod(tensors.get_slice(name).get_shape())
            counts["head" if name.startswith("head.") else "method"] += numel
    counts["total"] = counts["head"] + counts["method"]
    return {"tensor_bytes": path.stat().st_size, "stored_parameters": counts}


def load_exported(folder: str | os.PathLike, base_model: str | None = None):
    """Load an export folder with plain transformers; returns a function inputs -> logits.

    This is what a deployment does (the README shows the same few lines without microtune).
    A "peft+head" folder (`microtune.peft_format`) loads with peft over `base_model` (default:
    the base model it names).
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModel

    from microtune.heads import read_out

    folder = Path(folder)
    info = json.loads((folder / EXPORT_FILE).read_text())
    if info["format"] in STOCK_CLASSES:
        auto_class = getattr(transformers, STOCK_CLASSES[info["format"]])
        model = auto_class.from_pretrained(folder).eval()
        return lambda **inputs: model(**inputs).logits, model
    if info["format"] == "peft+head":
        from microtune.peft_format import load_peft

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
    cap = task_spec.task_type.export_check_examples
    if cap is not None:
        examples = cap if examples is None else min(examples, cap)
    columns = tuple(config["task"]["text_columns"]) if data_file else None
    label = config["task"].get("label_column") if data_file else None
    dev = load_split(
        task_spec, task_spec.dev_split, data_dir, data_file, columns, label, limit=examples
    )
    rows, _ = task_spec.task_type.encode(
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
    from microtune.data import batches

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


__all__ = [
    "train",
    "evaluate_artifact",
    "merge_artifact",
    "export_merged",
    "export_and_check",
    "artifact_summary",
    "load_exported",
    "predict",
]
