"""One bench cell, in its own process: `python -m microtune.bench.worker SPEC.json`.

Trains through `api.train` (the same path as `microtune train`) with a callback that times
every step and reads the batches the run trains on, then measures inference of the trained
model (unmerged), merged and the base model, interleaved in this process, and one training
step against one no-grad forward of the same batch. The record is written atomically to the
spec's `record` path, so a cell whose record exists is finished.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from microtune import api
from microtune.artifacts.store import read_artifact_config
from microtune.backbone.load import load_backbone
from microtune.backbone.options import ModelOptions
from microtune.bench.timing import (
    hardware,
    inference_times,
    length_sorted_batches,
    padded_fraction,
    run_batches,
    spread,
    step_vs_forward,
    sync,
    versions,
)
from microtune.common.files import write_json
from microtune.errors import MicrotuneError
from microtune.export.merged import check_rows
from microtune.model import TaskModel
from microtune.tasks.data import batches
from microtune.tasks.spec import DataSource
from microtune.training.callbacks import TrainerCallback
from microtune.training.config import TrainConfig
from microtune.training.samplers import ShuffledSampler


class BenchCallback(TrainerCallback):
    """Times each step, records peak memory, the padded-token fraction of the batches the run
    trains on (and of uniformly shuffled ones, for comparison) and keeps the first micro-batch
    and the trained model for the measurements after training."""

    def on_train_begin(self, trainer) -> None:
        self.model = trainer.model
        self.device = next(trainer.model.parameters()).device
        self.learning_rate = trainer.config.learning_rate
        self.step_seconds: list[float] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        size = trainer.config.batch_size
        lengths = [len(row["input_ids"]) for row in trainer.rows]
        planned = run_batches(trainer.sampler, trainer.total_steps)
        logical = size * trainer.config.grad_accum
        shuffled = ShuffledSampler(len(lengths), logical, trainer.config.seed)
        self.padding = {
            "padded_fraction": padded_fraction(lengths, planned, size)["fraction"],
            "shuffled_padded_fraction": padded_fraction(
                lengths, run_batches(shuffled, trainer.total_steps), size
            )["fraction"],
            "grouped_by_length": trainer.config.group_by_length,
        }
        first = planned[0][:size]
        self.batch = next(batches(trainer.rows, trainer.labels, size, trainer.pad_token_id, first))

    def on_step_begin(self, trainer) -> None:
        sync(self.device)
        self.started = time.perf_counter()

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None:
        sync(self.device)
        self.step_seconds.append(time.perf_counter() - self.started)

    def on_train_end(self, trainer) -> None:
        # Linux reports ru_maxrss in KiB (macOS in bytes).
        unit = 1 if sys.platform == "darwin" else 1024
        self.peak = {
            "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit,
            "cuda_allocated_bytes": torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda"
            else None,
        }


def train_config(spec: dict[str, Any]) -> TrainConfig:
    protocol = spec["protocol"]
    return TrainConfig(
        learning_rate=spec["lr"],
        head_learning_rate=spec.get("head_lr"),
        batch_size=protocol["batch_size"],
        grad_accum=protocol["grad_accum"],
        max_steps=protocol["max_steps"],
        epochs=protocol["epochs"],
        warmup_ratio=protocol["warmup_ratio"],
        lr_schedule=spec.get("lr_schedule") or "linear",
        weight_decay=protocol["weight_decay"],
        eval_every=0,
        checkpoint_every=0,
        eval_batch_size=protocol["eval_batch_size"],
        seed=spec["seed"],
        progress=False,
        group_by_length=protocol["group_by_length"],
    )


def train_command(spec: dict[str, Any]) -> str:
    """The `microtune train` command line that trains this cell the same way."""
    protocol = spec["protocol"]
    words = ["microtune", "train", "--task", spec["task"], "--method", spec["method"]]
    words += ["--output", spec["output"], "--seed", str(spec["seed"])]
    words += (
        ["--max-steps", str(protocol["max_steps"])]
        if protocol["max_steps"] is not None
        else ["--epochs", str(protocol["epochs"])]
    )
    if spec["lr"] is not None:
        words += ["--lr", repr(spec["lr"])]
    if spec.get("head_lr") is not None:
        words += ["--head-lr", repr(spec["head_lr"])]
    if spec.get("lr_schedule") is not None:
        words += ["--lr-schedule", spec["lr_schedule"]]
    for key in ("batch_size", "grad_accum", "max_length", "warmup_ratio", "weight_decay"):
        words += ["--" + key.replace("_", "-"), str(protocol[key])]
    if protocol["max_train_examples"]:
        words += ["--max-train-examples", str(protocol["max_train_examples"])]
    if not protocol["group_by_length"]:
        words.append("--no-group-by-length")
    if protocol["readout"]:
        words += ["--readout", protocol["readout"]]
    words += ["--dtype", protocol["dtype"], "--model", spec["model"], "--device", spec["device"]]
    if spec["data_dir"]:
        words += ["--data-dir", spec["data_dir"]]
    words += ["--eval-every", "0", "--checkpoint-every", "0", "--no-progress"]
    for key, value in spec["options"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            words += [flag, str(value)]
    return " ".join(words)


def measure_inference(model, spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Dev-set inference of the base model, the trained model unmerged and merged, interleaved;
    and max |logit merged - unmerged|."""

    timing, protocol = spec["timing"], spec["protocol"]
    base_backbone, tokenizer = load_backbone(
        spec["model"], protocol["dtype"], model.task_type.auto_class
    )
    # The same read-out and head, so that only the backbones differ.
    base = TaskModel(
        base_backbone,
        model.head_config,
        mask_token_id=model.mask_token_id,
        task_type=model.task_type,
    ).to(device)
    base.head.load_state_dict(model.head.state_dict())
    artifact = read_artifact_config(spec["output"])
    limit = timing["inference_examples"] or None  # 0: the whole dev set
    rows = check_rows(tokenizer, artifact, spec["data_dir"] or None, limit)
    inputs = length_sorted_batches(
        rows, protocol["eval_batch_size"], tokenizer.pad_token_id, device
    )
    models = {"base": base, "unmerged": model}
    result: dict[str, Any] = {"examples": len(rows), "batch_size": protocol["eval_batch_size"]}
    if model.method is None or type(model.method).mergeable:
        try:
            models["merged"] = copy.deepcopy(model).merge().eval()
        except Exception as error:  # a record with the reason beats a lost training run
            result["merge_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
    if "merged" in models:
        with torch.no_grad():
            model.eval()
            result["merged_max_abs_logit_diff"] = max(
                float((model(**b).float() - models["merged"](**b).float()).abs().max())
                for b in inputs
            )
    result.update(inference_times(models, inputs, timing["rounds"], device))
    result["rounds"] = timing["rounds"]
    return result


def cell_record(spec: dict[str, Any], report: dict[str, Any], watch: BenchCallback) -> dict:
    """What one cell's record holds before its inference and step timings."""
    protocol, timing = spec["protocol"], spec["timing"]
    model, device = watch.model, watch.device
    artifact = json.loads((Path(spec["output"]) / "microtune.json").read_text(encoding="utf-8"))
    metric = artifact["task"]["metrics"][0]  # as the task type fitted it to the rows
    steps = watch.step_seconds[1:] or watch.step_seconds  # the first step warms up
    record: dict[str, Any] = {
        "cell": spec["key"],
        "cell_hash": spec["cell_hash"],
        "config_hash": spec["config_hash"],
        "bench": spec["bench"],
        "label": spec["label"],
        "method": spec["method"],
        "options": spec["options"],
        "method_config": artifact["method_config"],
        "lr": watch.learning_rate,  # the method's default where the spec gives none
        "head_lr": spec.get("head_lr"),
        "lr_schedule": spec.get("lr_schedule"),
        "task": spec["task"],
        "seed": spec["seed"],
        "model": spec["model"],
        "metric": metric,
        "score": report["metrics"].get(metric),
        "metrics": report["metrics"],
        "trained": {k: report["trainable_parameters"][k] for k in ("method", "head")},
        "stored": {k: v for k, v in model.count_stored().items() if k != "total"},
        "stored_bytes": report["artifact_bytes"],
        "steps": report["steps"],
        "train_examples": report["train_examples"],
        "train_time_s": report["train_time_s"],
        "step_ms": spread(steps, 1000),
        "peak_memory": watch.peak,
        "padding": watch.padding,
        "protocol": protocol,
        "timing": timing,
        "device": report["device"],
        # Cells run at once share the cores: their timings are comparable only within a cell.
        "jobs": spec.get("jobs", 1),
        "threads": spec.get("threads"),
        "command": spec["command"],
        "train_command": train_command(spec),
        "versions": versions(),
        "hardware": hardware(device),
    }
    return record


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and measure one cell; returns its record."""

    started = time.time()
    protocol, timing = spec["protocol"], spec["timing"]
    watch = BenchCallback()
    report = api.train(
        spec["task"],
        spec["method"],
        spec["output"],
        method_options=spec["options"],
        model=ModelOptions(
            name=spec["model"],
            dtype=protocol["dtype"],
            device=spec["device"],
            max_length=protocol["max_length"],
            readout=protocol["readout"] or None,
        ),
        data=DataSource(
            data_dir=spec["data_dir"] or None,
            max_train_examples=protocol["max_train_examples"] or None,
        ),
        train_config=train_config(spec),
        plugins=[watch],
        existing="overwrite",
    )
    model, device = watch.model, watch.device
    record = cell_record(spec, report, watch)
    if timing["rounds"]:
        record["inference"] = measure_inference(model, spec, device)
    if timing["step_rounds"]:  # last: the step changes the model
        inputs = {k: v.to(device) for k, v in watch.batch[0].items()}
        labels = watch.batch[1].to(device)
        record["step_vs_forward"] = step_vs_forward(
            model, inputs, labels, timing["step_rounds"], watch.learning_rate, device
        )
    record["cell_time_s"] = round(time.time() - started, 2)
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the cell of the spec file named by the one argument; exit 2 on a `MicrotuneError`."""

    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        record = run_cell(spec)
    except MicrotuneError as error:
        print(f"microtune: error: {error}", file=sys.stderr)
        return 2
    write_json(spec["record"], record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
