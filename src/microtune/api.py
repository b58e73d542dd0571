"""The library's front door: train, evaluate, merge and export, as plain functions.

The CLI is a thin layer over these; notebooks and scripts call them directly. Merging and
exporting live in `microtune.export.merged` and are offered here as well, as the front door's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from microtune.artifacts import folders
from microtune.artifacts.store import (
    artifact_bytes,
    load_artifact,
    read_artifact_config,
    save_artifact,
)
from microtune.backbone.arch import arch_for
from microtune.backbone.load import check_max_length, fingerprint, load_backbone, resolve_device
from microtune.backbone.options import ModelOptions
from microtune.common.choices import DEFAULT_MODEL
from microtune.common.files import METRICS_FILE, TENSORS_FILE, write_json
from microtune.common.hub import resolve_artifact
from microtune.errors import MicrotuneError
from microtune.export.merged import export_and_check, export_merged, load_exported, merge_artifact
from microtune.methods import build_method, method_class
from microtune.model import HeadConfig, TaskModel
from microtune.privacy.config import DPConfig
from microtune.privacy.dpsgd import PrivacyPlugin
from microtune.tasks.examples import (
    examples_fingerprint,
    load_split,
    rows_to_examples,
    task_from_record,
    task_record,
    with_data_labels,
)
from microtune.tasks.heads import default_readout
from microtune.tasks.inference import predict
from microtune.tasks.spec import DataSource, Example, Task, get_task, load_rows
from microtune.tasks.types import TaskType, type_of
from microtune.training.callbacks import TrainerCallback
from microtune.training.config import DEFAULT_MAX_STEPS, TrainConfig
from microtune.training.distributed import World
from microtune.training.loop import Trainer, evaluate
from microtune.training.plugins import PluginBuilder, Plugins, combine_plugins
from microtune.version import __version__

EXISTING = ("refuse", "resume", "overwrite")  # what `train` does with a used output folder


def train(
    task: str,
    method: str,
    output_dir: str | os.PathLike,
    *,
    method_options: dict[str, Any] | None = None,
    model: str | ModelOptions = DEFAULT_MODEL,
    data: DataSource | None = None,
    train_config: TrainConfig | None = None,
    privacy: DPConfig | None = None,
    plugins: Sequence[PluginBuilder | TrainerCallback] = (),
    existing: str = "refuse",
) -> dict[str, Any] | None:
    """Train one method on one task; writes the artifact and metrics.json into output_dir.

    `model` names the base model, or gives `ModelOptions` (dtype of the frozen base, device,
    max_length, read-out and head); `data` says where the examples come from (`DataSource`:
    a data folder, your files, or the hub). The folder is locked while the run lasts; files
    microtune did not write, another run's artifact or an unfinished run's checkpoint are
    refused unless `existing` is "resume" (continue from the checkpoint) or "overwrite" (start
    over) (`artifacts.folders`).

    `plugins` are trainer plug-ins (`PluginBuilder`, recorded in metrics.json and the artifact
    under their names) and callbacks (`TrainerCallback`). `privacy` adds the DP-SGD plug-in:
    ε spent is metrics.json's `epsilon`. Under `torchrun` or `accelerate launch` the processes
    train together; rank 0 alone holds the folder and writes, the others return None.
    """
    started = time.time()
    if existing not in EXISTING:
        raise MicrotuneError(f"existing must be one of {EXISTING}, got {existing!r}")
    data = data or DataSource()
    data.check_for_training()
    options = ModelOptions(name=model) if isinstance(model, str) else model
    options = dataclasses.replace(options, name=_model_path(options.name))
    config = train_config or TrainConfig(max_steps=DEFAULT_MAX_STEPS)
    builders = [p for p in plugins if isinstance(p, PluginBuilder)]
    builders += [PrivacyPlugin(privacy)] if privacy is not None else []
    callbacks = [p for p in plugins if not isinstance(p, PluginBuilder)]
    world = World.from_env()
    options = dataclasses.replace(options, device=world.device(options.device))
    rules = {"resume": existing == "resume", "overwrite": existing == "overwrite"}
    rules["protected"] = folders.base_model_folders([options.name])
    group = world.group(resolve_device(options.device))
    with group, _rank0_folder(world, output_dir, **rules) as folder:
        training = TrainingData(task, data)
        training.load()
        run = start_run(training, method, method_options, options, config, builders, world)
        report = run.fit_and_save(folder, callbacks, existing == "resume", started)
    return report if world.is_main else None


def start_run(
    data: TrainingData,
    method: str,
    method_options: dict[str, Any] | None,
    model: ModelOptions,
    config: TrainConfig,
    builders: Sequence[PluginBuilder] = (),
    world: World | None = None,
) -> TrainingRun:
    """The one way a run is built (`train`, and both federated apps) from its loaded data: the
    task model in the order that makes a run reproducible (`TrainingRun.build_model`)."""
    run = TrainingRun(data, model, method, method_options, config, builders, world)
    run.build_model()
    return run


@contextmanager
def _rank0_folder(world: World, output_dir: str | os.PathLike, **rules: Any) -> Iterator[Path]:
    """`folders.training_folder` held by rank 0 alone; the other processes wait for its
    verdict and stop with the same one line when it refuses the folder."""
    if world.size == 1:
        with folders.training_folder(output_dir, **rules) as folder:
            yield folder
        return
    if not world.is_main:
        refusal = world.from_main(None)
        if refusal:
            raise MicrotuneError(refusal)
        yield Path(output_dir)
        return
    with ExitStack() as stack:
        try:
            folder = stack.enter_context(folders.training_folder(output_dir, **rules))
        except MicrotuneError as error:
            world.from_main(str(error))
            raise
        world.from_main(None)
        yield folder


def _model_path(model: str) -> str:
    """The base model's folder as an absolute path (the artifact must find it from anywhere)."""
    return os.path.abspath(model) if os.path.isdir(model) else model


class TrainingData:
    """The task of one run, its training and dev examples, and the source they were read from."""

    def __init__(self, task: str, source: DataSource):
        self.task, self.source = get_task(task), source
        self.train: list[Example] = []
        self.dev: list[Example] = []

    def load(self) -> None:
        """Read both splits; the label set from the training rows where the task says so."""
        task, source = self.task, self.source
        columns, label_column = source.text_columns, source.label_column
        rows, origin = load_rows(task, "train", source.data_dir, source.file("train"))
        if source.max_train_examples is not None:
            rows = rows[: source.max_train_examples]
        if task.labels_from_data:
            task = with_data_labels(task, rows, origin, label_column, source.labels)
        elif source.labels:
            raise MicrotuneError(
                f"--labels applies to tasks that read their labels from the data, not to "
                f"{task.name}"
            )
        self.task = task = type_of(task).fit_rows(task, rows, columns)
        self.train = rows_to_examples(task, rows, origin, columns, label_column)
        self.dev = load_split(
            task, task.dev_split, source.data_dir, source.file("dev"), columns, label_column
        )

    def record(self) -> dict[str, Any]:
        return task_record(self.task, self.source.text_columns, self.source.label_column)


class TrainingRun:
    """One run's task model, trainer and plug-ins, built in the order that makes a run
    reproducible: seed, base model, method, head, then the encoded rows and the plug-ins."""

    def __init__(
        self,
        data: TrainingData,
        model: ModelOptions,
        method: str,
        method_options: dict[str, Any] | None,
        config: TrainConfig,
        builders: Sequence[PluginBuilder] = (),
        world: World | None = None,
    ):
        self.data, self.options = data, model
        self.model, self.max_length = model.name, model.max_length  # as artifacts record them
        self.method, self.method_options = method, method_options
        self.config, self.builders = config, list(builders)
        self.built: list[Plugins] = []
        self.world = world or World()  # the processes that train together

    def build_model(self) -> None:
        task_type, options = type_of(self.data.task), self.options
        torch.manual_seed(self.config.seed)
        backbone, self.tokenizer = load_backbone(self.model, options.dtype, task_type.auto_class)
        check_max_length(backbone, self.max_length)
        self.base_fingerprint = fingerprint(backbone)
        method = build_method(self.method, self.method_options)
        if self.config.learning_rate is None:
            self.config = dataclasses.replace(
                self.config, learning_rate=method.default_learning_rate
            )
        causal = arch_for(backbone).causal
        head = head_config(task_type, self.data.task, causal, options)
        self.task_model = TaskModel(
            backbone, head, method, mask_token_id=self.tokenizer.mask_token_id, task_type=task_type
        )
        self.task_model.to(resolve_device(options.device))
        if not self.task_model.count_trainable()["total"]:
            raise MicrotuneError(
                f"nothing trains: method '{self.method}' adds no tensors of its own and the "
                f"{task_type.name} task keeps the base model's head frozen; choose another method"
            )

    def trainer(self, output_dir: Path, callbacks: Sequence[TrainerCallback]) -> Trainer:
        """The trainer over the encoded rows, with the plug-ins built for this training set."""
        task, tokenizer, config = self.data.task, self.tokenizer, self.config
        pad_id = tokenizer.pad_token_id
        encode = self.task_model.encode
        train_rows, train_labels = encode(tokenizer, self.data.train, self.max_length)
        dev_rows, dev_labels = encode(tokenizer, self.data.dev, self.max_length)
        self.built = [b.build(self.task_model, config, len(train_rows)) for b in self.builders]
        plugins = combine_plugins(self.built)
        return Trainer(
            self.task_model,
            config,
            train_rows,
            train_labels,
            pad_id,
            output_dir,
            evaluate_fn=lambda m: evaluate(
                m,
                task,
                dev_rows,
                dev_labels,
                tokenizer.pad_token_id,
                config.eval_batch_size,
                tokenizer,
                progress=config.progress and self.world.is_main,
            ),
            main_metric=task.main_metric,
            run_signature=self.signature(len(self.data.train)),
            sampler=plugins.sampler,
            step=plugins.step,
            callbacks=[*plugins.callbacks, *callbacks],
            world=self.world,
        )

    def fit_and_save(
        self, output_dir: Path, callbacks: Sequence[TrainerCallback], resume: bool, started: float
    ) -> dict[str, Any] | None:
        """Train (or continue from the checkpoint), save the artifact, drop the checkpoint and
        write metrics.json; returns what metrics.json holds (None on ranks other than 0)."""
        trainer = self.trainer(output_dir, callbacks)
        train_started = time.time()
        dev_metrics = trainer.fit(resume=resume)
        train_seconds = time.time() - train_started
        if not self.world.is_main:
            return None
        records = self.records()
        size = save_artifact(
            output_dir,
            self.task_model,
            method_name=self.method,
            base_model=self.model,
            base_fingerprint=self.base_fingerprint,
            task=self.data.record(),
            max_length=self.max_length,
            extra=records or None,
            tokenizer=self.tokenizer,
        )
        trainer.remove_checkpoint()
        report = self.report(trainer, dev_metrics, size, records, train_seconds, started)
        write_json(output_dir / METRICS_FILE, report)
        return report

    def signature(self, train_examples: int) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint."""
        return {
            "model": self.model,
            "base_fingerprint": self.base_fingerprint,
            "method": self.method,
            "method_config": self.task_model.method.config.to_dict(),
            "head": dataclasses.asdict(self.task_model.head_config),
            "task": self.data.record(),
            "max_length": self.max_length,
            "train_examples": train_examples,
            "train_data_sha256": examples_fingerprint(self.data.train),
            **{builder.name: builder.settings() for builder in self.builders},
        }

    def records(self) -> dict[str, Any]:
        """Each plug-in's record of the run, by its name (those that record nothing left out)."""
        records = {}
        for builder, built in zip(self.builders, self.built, strict=True):
            record = built.record() if built.record is not None else None
            if record is not None:
                records[builder.name] = record
        return records

    def report(
        self,
        trainer: Trainer,
        dev_metrics: dict[str, Any],
        size: int,
        records: dict[str, Any],
        train_seconds: float,
        started: float,
    ) -> dict[str, Any]:
        """metrics.json: what ran, its dev metrics, sizes, times and the plug-ins' records."""
        report = {
            "task": self.data.task.name,
            "method": self.method,
            "model": self.model,
            "seed": self.config.seed,
            "steps": trainer.step,
            "train_examples": len(self.data.train),
            "metrics": dev_metrics,
            "trainable_parameters": self.task_model.count_trainable(),
            "artifact_bytes": size,
            "train_time_s": round(train_seconds, 2),
            "wall_time_s": round(time.time() - started, 2),
            "device": str(next(self.task_model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "processes": self.world.size,
            "library_version": __version__,
        }
        for builder in self.builders:
            if builder.name in records:
                record = records[builder.name]
                report.update({key: record[key] for key in builder.headline})
                report[builder.name] = record
        return report


def head_config(task_type: TaskType, task: Task, causal: bool, options: ModelOptions) -> HeadConfig:
    """The head a task type gives a task on this backbone, with the user's choices applied."""
    chosen = task_type.readout(options.readout, default_readout(causal))
    bias = options.head_bias
    return HeadConfig(
        num_labels=task.num_labels,
        readout=chosen,
        head_dropout=options.head_dropout,
        bias=task_type.default_head_bias(chosen, causal) if bias is None else bias,
    )


def evaluate_artifact(
    artifact_dir: str | os.PathLike,
    *,
    task: str | None = None,
    split: str | None = None,
    model: str | None = None,
    data: DataSource | None = None,
    batch_size: int = 64,
    progress: bool = True,
    breakdown: bool = False,
) -> dict[str, Any]:
    """Metrics of a saved artifact on one split (default: the task's dev split), with a
    progress bar over its batches on stderr (`progress`), and with `breakdown` the task
    type's report beside them (classification: `per_class` precision, recall, F1 and support
    by label name, and the `confusion_matrix`).

    `data` names the rows (a data folder, or your dev file or rows: `dev_file`, `dev_rows`);
    columns default to those the artifact was trained with. Another task than the artifact's
    is refused unless the rows are named explicitly: then its labels must still fit the head."""
    data = data or DataSource()
    own_rows = data.file("dev")
    trained_on = read_artifact_config(artifact_dir)["task"]["name"]
    if task is not None and task != trained_on and own_rows is None:
        raise MicrotuneError(
            f"the artifact was trained on '{trained_on}', not '{task}'; leave out --task to "
            f"evaluate on {trained_on}, or evaluate on other data explicitly with --data-file "
            "(and --text-columns, --label-column), whose labels must fit the artifact's head"
        )
    task_model, tokenizer, config = load_artifact(artifact_dir, model)
    columns, label_column = data.text_columns, data.label_column
    if task is None or task == config["task"]["name"]:
        columns = columns or tuple(config["task"]["text_columns"])
        label_column = label_column or config["task"].get("label_column", "label")
        task_spec = artifact_task(config, task_model, columns)
    else:
        task_spec = get_task(task)
        _check_task_fits(task_spec, task_model, config)
    split = split or task_spec.dev_split
    examples = load_split(task_spec, split, data.data_dir, own_rows, columns, label_column)
    rows, labels = task_model.encode(tokenizer, examples, config["max_length"])
    pad_id = tokenizer.pad_token_id
    return evaluate(
        task_model, task_spec, rows, labels, pad_id, batch_size, tokenizer,
        progress=progress, breakdown=breakdown,
    )  # fmt: skip


def _check_task_fits(task_spec: Task, task_model: TaskModel, config: dict[str, Any]) -> None:
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


def artifact_task(
    config: dict[str, Any], task_model: TaskModel, text_columns: tuple[str, ...] | None = None
) -> Task:
    """The task an artifact was trained on, checked against its model exactly as `eval` checks
    it (so `info` refuses what `eval` refuses)."""
    task_spec = task_from_record(config["task"])
    columns = text_columns or tuple(config["task"]["text_columns"])
    task_spec = type_of(task_spec).fit_rows(task_spec, [], columns)
    _check_task_fits(task_spec, task_model, config)
    return task_spec


def artifact_summary(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """What `microtune info --artifact` prints: method, sizes, base model, metrics if present."""
    artifact_dir = resolve_artifact(artifact_dir)  # a hub id: its cached folder, fetched once
    config = read_artifact_config(artifact_dir)
    # Checked as every other command checks it (tensor file, names, shapes, dtypes, values,
    # base model and tokenizer, its task against its head), so `info` never describes an
    # artifact the others refuse.
    task_model, _, _ = load_artifact(artifact_dir)
    artifact_task(config, task_model)
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
    privacy = privacy_record(config)
    if privacy is not None:
        summary["privacy"] = privacy
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


def privacy_record(config: dict[str, Any]) -> dict[str, Any] | None:
    """The artifact's DP record: a DP-SGD run's "privacy", or a federation's client-level or
    sample-level DP (target, σ, δ and ε spent); None for a run without DP."""
    if config.get("privacy"):
        return config["privacy"]
    federated = config.get("federated") or {}
    for level in ("client", "sample"):
        if federated.get(f"{level}_dp"):
            return {"level": f"{level} (federated)", **federated[f"{level}_dp"]}
    return None


def stored_tensor_summary(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """Bytes of the artifact's tensor file and the numbers it stores (head and method, as
    `TaskModel.count_stored`), read from the safetensors header alone."""

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
