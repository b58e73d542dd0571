"""Callbacks: hooks into the trainer's loop (`TrainerCallback`), and the built-in ones every
run has: evaluation, the JSONL log, the progress bar and checkpoints."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from microtune.common.progress import progress_bar

if TYPE_CHECKING:
    from microtune.training.loop import Trainer


class TrainerCallback:
    """Hooks into the loop, in the style of `transformers.TrainerCallback`. Override any.

    `on_step_end` gets the step's log record (step, loss, lr); a callback may put live values
    (e.g. ε spent) into `trainer.live`, which the log lines and the progress bar show, and may
    end training with `trainer.stop(reason)`.
    """

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


class EvaluateCallback(TrainerCallback):
    """Dev evaluation every `eval_every` steps and once at the end."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        every = trainer.config.eval_every
        if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
            trainer.evaluate()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.evaluate()


class LogCallback(TrainerCallback):
    """JSONL lines: the loss averaged since the last line, the learning rate, live values."""

    def on_train_begin(self, trainer: Trainer) -> None:
        self.losses: list[float] = []
        self.started = time.time()

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self.losses.append(logs["loss"])
        if trainer.is_log_step():
            record = {"step": trainer.step, "loss": sum(self.losses) / len(self.losses)}
            record.update(lr=logs["lr"], elapsed_s=round(time.time() - self.started, 3))
            trainer.log({**record, **trainer.live})
            self.losses = []


class ProgressCallback(TrainerCallback):
    """A tqdm bar with the last loss, the main dev metric and live values in its postfix."""

    def on_train_begin(self, trainer: Trainer) -> None:
        config = trainer.config
        self.bar = progress_bar(
            trainer.total_steps,
            # Say up front how much one step is, so a long accumulation is not a silent wait.
            f"train ({config.batch_size}x{config.grad_accum} per step)"
            if config.grad_accum > 1
            else "train",
            "step",
            enabled=config.progress and trainer.world.is_main,
            initial=trainer.step,
        )

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        postfix = {"loss": f"{logs['loss']:.4f}"}
        if trainer.last_metrics.get(trainer.main_metric) is not None:
            postfix[trainer.main_metric] = f"{trainer.last_metrics[trainer.main_metric]:.4f}"
        postfix.update({k: str(v) for k, v in trainer.live.items()})
        self.bar.set_postfix(postfix, refresh=False)  # shown by update: rarely in a log file
        self.bar.update(1)

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


class CheckpointCallback(TrainerCallback):
    """An atomic checkpoint every `checkpoint_every` steps (not at the last: the artifact is)."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        every = trainer.config.checkpoint_every
        if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
            trainer.save_checkpoint()
