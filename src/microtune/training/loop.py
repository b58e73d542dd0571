"""The trainer: a short loop over plug-ins, with evaluation, logging, checkpoints and resume.

It trains whatever parameters of the model require gradients and never knows which method
produced them; its settings are `config.TrainConfig`. Three plug-ins shape a run: a sampler
(`samplers`: which examples form each logical batch), a step (`steps`: how a logical batch,
cut into micro-batches, becomes an update) and callbacks (`callbacks`: evaluation, logging,
progress, checkpoints, early stop); `plugins` supplies them from outside. Checkpoints and
resume: `checkpoints`.

Under `torchrun` or `accelerate launch` (a `distributed.World` of several processes) every
process draws the same logical batches and trains on its share (`World.shard`); the step sums
the gradients of the trainable tensors over the processes (one all-reduce) before the update,
so every process holds the same parameters. Rank 0 alone logs, evaluates, shows progress and
writes checkpoints (holding every rank's RNG state); its decision to stop is everyone's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from microtune.common.files import CHECKPOINT_FILE, LOG_FILE
from microtune.errors import MicrotuneError
from microtune.tasks.data import Encoded, batches
from microtune.tasks.spec import Task
from microtune.tasks.types import type_of
from microtune.training.callbacks import (
    CheckpointCallback,
    EvaluateCallback,
    LogCallback,
    ProgressCallback,
    TrainerCallback,
)
from microtune.training.checkpoints import (
    check_same_run,
    read_checkpoint,
    restore_checkpoint,
    resume_signature,
    rng_state,
    trim_log,
    write_checkpoint,
)
from microtune.training.config import TrainConfig
from microtune.training.distributed import SINGLE, World
from microtune.training.samplers import Sampler, default_sampler
from microtune.training.steps import AdamWStep, Diverged


def evaluate(
    model: nn.Module,
    task: Task,
    rows: Sequence[Encoded],
    labels: Sequence,
    pad_token_id: int,
    batch_size: int = 64,
    tokenizer: Any = None,
    *,
    progress: bool = False,
    breakdown: bool = False,
) -> dict[str, Any]:
    """The task's metrics on these rows, by its task type (`TaskType.evaluate`: by default
    `score` of `predict`'s outputs, refused when not finite); `tokenizer` for types that read
    generated text back (the causal LM's exact match); `progress`: a bar over the batches;
    `breakdown`: the type's per-class report too (`TaskType.breakdown`)."""
    return type_of(task).evaluate(
        model,
        task,
        rows,
        labels,
        pad_token_id,
        batch_size,
        tokenizer,
        progress=progress,
        breakdown=breakdown,
    )


def enable_activation_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Turn on transformers' activation checkpointing, non-reentrant, in the pretrained models
    inside `model`; returns the blocks it recomputes.

    Non-reentrant (`use_reentrant=False`) because the reentrant checkpoint hides from autograd
    which parameters a block used: a tensor used in every block (SLaSh's z) is then "marked
    ready twice" under DDP (peft#313, accelerate#3536), and a parameter a step leaves unused
    breaks it as well; the non-reentrant one is plain autograd, recomputed.
    """
    kwargs = {"use_reentrant": False}
    for backbone in model.modules():
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            continue
        if hasattr(backbone, "activation_checkpointing_enable"):  # its name since 5.x
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]
    if not blocks:
        raise MicrotuneError(
            "--gradient-checkpointing: this base model's transformers class cannot recompute "
            "its blocks; drop the flag (or lower --batch-size and raise --grad-accum)"
        )
    return blocks


@dataclass
class TrainerOptions:
    """The keyword arguments of `Trainer`, all optional.

    Attributes:
        evaluate_fn: the dev metrics of the model (None: no evaluation).
        main_metric: the dev metric the progress bar shows.
        run_signature: what a resumed run must share with the checkpoint's (method, head...).
        sampler: which examples form each logical batch (default: `default_sampler`).
        step: how a logical batch becomes an update (default: `AdamWStep`).
        callbacks: run before the built-in evaluation, log, progress and checkpoint callbacks.
        world: the processes that train together (default: this one).
    """

    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None
    main_metric: str | None = None
    run_signature: dict | None = None
    sampler: Sampler | None = None
    step: AdamWStep | None = None
    callbacks: Sequence[TrainerCallback] = ()
    world: World = field(default_factory=lambda: SINGLE)


class Trainer:
    """Trains `model` (its parameters that require grad) on encoded rows and labels.

    Plug-ins (`TrainerOptions`, as keyword arguments): `sampler` (which examples form each
    logical batch; default: the shuffled epoch order in batches of batch_size * grad_accum),
    `step` (how a logical batch, cut into micro-batches of batch_size, becomes an update;
    default `AdamWStep`) and `callbacks` (run before the built-in evaluation, logging, progress
    and checkpoint callbacks). `world`: the processes that train together (`distributed.World`;
    default: this one).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_rows: Sequence[Encoded],
        train_labels: Sequence,
        pad_token_id: int,
        output_dir: str | os.PathLike,
        **options: Any,
    ):
        settings = TrainerOptions(**options)
        self.model, self.world, self.config = model, settings.world, config
        self.rows, self.labels, self.pad_token_id = train_rows, train_labels, pad_token_id
        self.output_dir = Path(output_dir)
        self.evaluate_fn, self.main_metric = settings.evaluate_fn, settings.main_metric
        self.run_signature = resume_signature(settings.run_signature, config, self.world)
        if config.learning_rate is None:
            raise MicrotuneError("TrainConfig.learning_rate is not set (api.train fills it in)")
        self.parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.parameters:
            raise MicrotuneError("the model has no trainable parameters")
        self._plug_in(settings)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # position inside the current epoch, in logical batches
        self.last_metrics: dict[str, float] = {}
        self.evaluated_at: int | None = None
        self.live: dict[str, Any] = {}  # values callbacks show in log lines and the progress bar
        self.stop_reason: str | None = None

    def _plug_in(self, settings: TrainerOptions) -> None:
        """The sampler, the bound step, activation checkpointing and the callbacks."""
        config, sampler = self.config, settings.sampler
        if sampler is None:
            config.check_logical_batch(len(self.rows))
        self.sampler = sampler or default_sampler(config, self.rows, self.world.size)
        self.total_steps = config.steps_for(self.sampler.batches_per_epoch)
        self.step_plugin = settings.step or AdamWStep()
        self.step_plugin.bind(self.model, self.parameters, config, self.total_steps, self.world)
        self.checkpointed = (
            enable_activation_checkpointing(self.model) if config.gradient_checkpointing else []
        )
        if self.checkpointed:
            self.train_mode()  # refuses a step that trains in eval mode, before any step
        evaluation = [EvaluateCallback()] if self.evaluate_fn else []
        self.callbacks = [
            *settings.callbacks,
            *evaluation,
            LogCallback(),
            ProgressCallback(),
            CheckpointCallback(),
        ]

    # -- what callbacks use ------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """End training before the next step (the final evaluation still runs)."""
        self.stop_reason = reason

    def is_log_step(self) -> bool:
        return self.step % self.config.log_every == 0 or self.step == self.total_steps

    def log(self, record: dict) -> None:
        if not self.world.is_main:
            return
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")

    def evaluate(self) -> None:
        """Evaluate on the dev set (once per step, on rank 0), log it and tell the callbacks."""
        if self.evaluate_fn is None or self.evaluated_at == self.step or not self.world.is_main:
            return
        self.last_metrics = self.evaluate_fn(self.model)
        self.evaluated_at = self.step
        self.train_mode()
        self.log({"step": self.step, "eval": self.last_metrics})
        self._call("on_evaluate", self.last_metrics)

    def train_mode(self) -> None:
        """The step's training mode; checkpointed blocks in training mode themselves.

        transformers recomputes a block only when it is in training mode, and a frozen backbone
        without dropout is kept in eval mode (`TaskModel.train`): the blocks' own flags (not
        their submodules', so dropout stays off) are set here.
        """
        self.step_plugin.train_mode(self.model)
        if not self.checkpointed:
            return
        if not self.model.training:
            raise MicrotuneError(
                "--gradient-checkpointing: this run's step trains in eval mode (DP-SGD's "
                "per-example gradients), where blocks are not recomputed; drop the flag"
            )
        for block in self.checkpointed:
            block.training = True

    # -- checkpoints (`checkpoints`) ---------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        """Every rank gives its RNG state; rank 0 writes the checkpoint."""
        every_rng = self.world.gather(rng_state())
        if not self.world.is_main:
            return
        loop_state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "run_signature": self.run_signature,
            "last_metrics": self.last_metrics,
        }
        write_checkpoint(
            self.checkpoint_path, self.parameters, self.step_plugin, every_rng, loop_state
        )

    def load_checkpoint(self) -> None:
        path, rank = self.checkpoint_path, self.world.rank
        meta, tensors = read_checkpoint(path, self.parameters, rank)
        check_same_run(path, meta, self.run_signature, self.parameters)
        restore_checkpoint(path, meta, tensors, self.parameters, self.step_plugin, rank)
        self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
        self.batch_in_epoch = int(meta["batch_in_epoch"])
        self.last_metrics = meta["last_metrics"]

    def remove_checkpoint(self) -> None:
        if self.world.is_main and self.checkpoint_path.is_file():
            self.checkpoint_path.unlink()

    # -- the loop ----------------------------------------------------------------------------

    def _logical_batches(self) -> Iterator[list[int]]:
        """Yield logical batches from the current (epoch, batch_in_epoch) position onwards."""
        while True:
            for indices in self.sampler.epoch(self.epoch)[self.batch_in_epoch :]:
                self.batch_in_epoch += 1
                yield indices
            self.epoch += 1
            self.batch_in_epoch = 0

    def _micro_batches(self, indices: list[int]) -> Iterator:
        """This process's share of the logical batch cut into micro-batches of batch_size, on
        the model's device."""
        device = next(self.model.parameters()).device
        size, share = self.config.batch_size, self.world.shard(indices)
        for inputs, labels in batches(self.rows, self.labels, size, self.pad_token_id, share):
            yield {k: v.to(device) for k, v in inputs.items()}, labels.to(device)

    def _diverged(self, error: Diverged) -> MicrotuneError:
        """The one-line error for a diverged step, with its likely cause; logged as well."""
        step = self.step + 1
        others = "the labels and the method's scale options (e.g. --projection-std-scale)"
        if step == 1 and error.before_update:  # no update has happened yet: not the lr
            cause = f"the starting model already gives it: check {others}"
        else:
            cause = f"lower --lr (now {self.config.learning_rate:g}) or check {others}"
        self.log({"step": step, "diverged": error.problem})
        return MicrotuneError(f"training diverged at step {step}: {error.problem}; {cause}")

    def _call(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def _start(self, resume: bool) -> None:
        """Continue from the checkpoint (or start over), every process from rank 0's tensors."""
        main = self.world.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 decides, so that all resume or none (each reads the checkpoint itself).
        if self.world.from_main(resume and self.checkpoint_path.is_file()):
            self.load_checkpoint()
            if main:
                trim_log(self.output_dir / LOG_FILE, self.step)
        elif main and (self.output_dir / LOG_FILE).exists():
            (self.output_dir / LOG_FILE).unlink()
        # Every process starts from rank 0's tensors, as DDP does.
        self.world.broadcast_tensors(list(self.parameters.values()))

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to the end (or continue from the checkpoint); returns the final dev metrics
        (rank 0's: the other processes do not evaluate)."""
        self._start(resume)
        self.train_mode()
        self._call("on_train_begin")
        stream = self._logical_batches()
        while self.step < self.total_steps:
            self._call("on_step_begin")
            self.stop_reason = self.world.from_main(self.stop_reason)
            if self.stop_reason:
                self.log({"step": self.step, "stopped": self.stop_reason})
                break
            indices = next(stream)
            try:
                loss = self.step_plugin(self.model, self._micro_batches(indices), len(indices))
            except Diverged as error:
                raise self._diverged(error) from None
            self.step += 1
            self._call("on_step_end", {"loss": loss, "lr": self.step_plugin.learning_rate})
        self._call("on_train_end")
        return self.last_metrics
