"""The trainer: AdamW with warmup and linear decay, evaluation, logging, checkpoints, resume.

It trains whatever parameters of the model require gradients and never knows which method
produced them. A checkpoint is one safetensors file (tensors plus JSON metadata), written
atomically, that holds everything needed to continue bit for bit: the trainable tensors, the
optimizer state, the RNG state and the position in the data stream.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from microtune.artifact import write_tensors
from microtune.data import Encoded, batches, epoch_order
from microtune.errors import MicrotuneError
from microtune.metrics import compute_metrics
from microtune.tasks import Task

CHECKPOINT_FILE = "checkpoint.safetensors"
DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor epochs is given (CLI and api.train)
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        learning_rate: peak learning rate of AdamW (None: the method's default).
        batch_size: examples per forward pass (micro-batch).
        grad_accum: micro-batches per optimizer step (logical batch = batch_size * grad_accum).
        max_steps: optimizer steps to run; takes precedence over epochs.
        epochs: passes over the training data, when max_steps is not set.
        warmup_ratio: fraction of the steps with linear warmup; then linear decay to zero.
        weight_decay: AdamW decoupled weight decay.
        eval_every: evaluate on the dev set every N steps (0: only at the end).
        checkpoint_every: write a checkpoint every N steps (0: never).
        log_every: write a loss line to the JSONL log every N steps.
        eval_batch_size: batch size for evaluation.
        seed: seeds the data order, initialisation and dropout.
        progress: show a progress bar.
    """

    learning_rate: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    eval_every: int = 250
    checkpoint_every: int = 100
    log_every: int = 10
    eval_batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise MicrotuneError("set a training length: --max-steps N or --epochs E")
        if self.max_steps is not None and self.max_steps < 1:
            raise MicrotuneError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise MicrotuneError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise MicrotuneError("--batch-size and --grad-accum must be at least 1")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise MicrotuneError(f"--lr must be positive, got {self.learning_rate}")
        if self.eval_every < 0 or self.checkpoint_every < 0 or self.log_every < 1:
            raise MicrotuneError(
                "--eval-every and --checkpoint-every must be >= 0 (0: off), log_every >= 1"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise MicrotuneError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")

    def total_steps(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = math.ceil(num_examples / (self.batch_size * self.grad_accum))
        return max(1, math.ceil(self.epochs * per_epoch))


# Settings that may differ between a run and its resumption: they do not change the result.
_RESUMABLE = ("progress", "eval_every", "checkpoint_every", "log_every", "eval_batch_size")


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classes; MSE for one-output regression (STS-B)."""
    if logits.shape[-1] == 1:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return nn.functional.cross_entropy(logits, labels)


@torch.no_grad()
def predict(
    model: nn.Module, rows: Sequence[Encoded], pad_token_id: int, batch_size: int = 64
) -> np.ndarray:
    """Logits of every row, in order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dummy = [0] * len(rows)
    outputs = []
    for inputs, _ in batches(rows, dummy, batch_size, pad_token_id):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        outputs.append(model(**inputs).float().cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def evaluate(
    model: nn.Module,
    task: Task,
    rows: Sequence[Encoded],
    labels: Sequence,
    pad_token_id: int,
    batch_size: int = 64,
) -> dict[str, float]:
    logits = predict(model, rows, pad_token_id, batch_size)
    predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return compute_metrics(task.metrics, predictions, labels)


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class Trainer:
    """Trains `model` (its parameters that require grad) on encoded rows and labels."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_rows: Sequence[Encoded],
        train_labels: Sequence,
        pad_token_id: int,
        output_dir: str | os.PathLike,
        evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        main_metric: str | None = None,
        run_signature: dict | None = None,
    ):
        self.model = model
        self.config = config
        self.rows = train_rows
        self.labels = train_labels
        self.pad_token_id = pad_token_id
        self.output_dir = Path(output_dir)
        self.evaluate_fn = evaluate_fn
        self.main_metric = main_metric
        # What must not change between a run and its resumption (method, head, base model...).
        self.run_signature = {
            **(run_signature or {}),
            "train_config": {k: v for k, v in asdict(config).items() if k not in _RESUMABLE},
        }
        if config.learning_rate is None:
            raise MicrotuneError("TrainConfig.learning_rate is not set (api.train fills it in)")
        self.parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.parameters:
            raise MicrotuneError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.parameters.values(),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.total_steps = config.total_steps(len(train_rows))
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(warmup, self.total_steps)
        )
        self.step = 0
        self.epoch = 0
        self.micro_batch = 0  # position inside the current epoch, in micro-batches
        self.last_metrics: dict[str, float] = {}

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        tensors = {f"model.{n}": p for n, p in self.parameters.items()}
        state = self.optimizer.state_dict()
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "micro_batch": self.micro_batch,
            "param_groups": state["param_groups"],
            "param_shapes": {n: list(p.shape) for n, p in self.parameters.items()},
            "run_signature": self.run_signature,
            "last_metrics": self.last_metrics,
        }
        write_tensors(self.checkpoint_path, tensors, metadata={"json": json.dumps(meta)})

    def load_checkpoint(self) -> None:
        with safe_open(self.checkpoint_path, framework="pt") as handle:
            meta = json.loads(handle.metadata()["json"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        changed = _differences(meta["run_signature"], self.run_signature)
        if changed or meta["param_shapes"] != {
            n: list(p.shape) for n, p in self.parameters.items()
        }:
            raise MicrotuneError(
                f"{self.checkpoint_path} was written by a run with other settings "
                f"({', '.join(changed) or 'trainable parameters'}); resume with the same "
                "command, or remove the checkpoint to start over"
            )
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(tensors[f"model.{name}"])
        optimizer_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step, self.epoch, self.micro_batch = meta["step"], meta["epoch"], meta["micro_batch"]
        self.scheduler.last_epoch = self.step
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.last_metrics = meta["last_metrics"]

    # -- logging -----------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """After a resume, drop log lines from steps the crashed run did past its checkpoint."""
        path = self.output_dir / LOG_FILE
        if path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if _log_step(line) is not None and _log_step(line) <= self.step
            ]
            path.write_text("".join(line + "\n" for line in kept))

    # -- the loop ----------------------------------------------------------------------------

    def _micro_batches(self):
        """Yield micro-batches from the current (epoch, micro_batch) position onwards."""
        size = self.config.batch_size
        while True:
            order = epoch_order(len(self.rows), self.config.seed, self.epoch)
            start = self.micro_batch * size
            for batch in batches(self.rows, self.labels, size, self.pad_token_id, order[start:]):
                self.micro_batch += 1
                yield batch
            self.epoch += 1
            self.micro_batch = 0

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to the end (or continue from the checkpoint); returns the final dev metrics."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.is_file():
            self.load_checkpoint()
            self._trim_log()
        elif (self.output_dir / LOG_FILE).exists():
            (self.output_dir / LOG_FILE).unlink()
        config = self.config
        device = next(self.model.parameters()).device
        self.model.train()
        stream = self._micro_batches()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not config.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            # In a log file (no terminal) every redraw is a new line: redraw rarely there.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        running_loss, running_count = 0.0, 0
        started = time.time()
        while self.step < self.total_steps:
            step_loss = 0.0
            for _ in range(config.grad_accum):
                inputs, labels = next(stream)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                loss = loss_fn(self.model(**inputs), labels.to(device))
                (loss / config.grad_accum).backward()
                step_loss += loss.item() / config.grad_accum
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            running_loss += step_loss
            running_count += 1
            bar.update(1)
            postfix = {"loss": f"{step_loss:.4f}"}
            if self.main_metric in self.last_metrics:
                postfix[self.main_metric] = f"{self.last_metrics[self.main_metric]:.4f}"
            bar.set_postfix(postfix)
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                self._log(
                    {
                        "step": self.step,
                        "loss": running_loss / running_count,
                        "lr": self.scheduler.get_last_lr()[0],
                        "elapsed_s": round(time.time() - started, 3),
                    }
                )
                running_loss, running_count = 0.0, 0
            final = self.step == self.total_steps
            if self.evaluate_fn and (
                final or (config.eval_every and self.step % config.eval_every == 0)
            ):
                self.last_metrics = self.evaluate_fn(self.model)
                self.model.train()
                self._log({"step": self.step, "eval": self.last_metrics})
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and not final:
                self.save_checkpoint()
        bar.close()
        return self.last_metrics

    def remove_checkpoint(self) -> None:
        if self.checkpoint_path.is_file():
            self.checkpoint_path.unlink()


def _log_step(line: str) -> int | None:
    """The step of a JSONL log line; None for a line torn by a crash mid-write."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return None


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two nested dicts."""
    names = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names
