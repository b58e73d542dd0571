"""Optimisation settings of a training run (`TrainConfig`), free of torch so that the command
line builds its options from this dataclass without loading the heavy stack."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from microtune.common.checks import check_seed
from microtune.errors import MicrotuneError

DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor epochs is given (CLI and api.train)
# Bound of --lr and --weight-decay, far above any useful value: it keeps AdamW's own step
# arithmetic (lr / (1 - beta1^t), 1 - lr * wd) inside float32, so a huge value reaches the
# numerics guard as a diverged step instead of overflowing inside torch.
MAX_RATE = 1e6
LR_SCHEDULES = ("linear", "cosine", "constant")  # training.steps.DECAYS computes each


@dataclass
class TrainConfig:
    """Optimisation settings. Each field's help text is in its metadata, where the command line
    (`microtune.cli.options`) also reads its flag when that is not the field's name ("flag"), its
    wording on the command line where that differs ("cli_help"), or that it has none ("cli")."""

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate of AdamW (None: the method's default).",
            "flag": "--lr",
            "cli_help": "peak learning rate (default: the method's, e.g. slash 2e-2)",
        },
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate of the task head's parameters (None: --lr's), e.g. "
            "to train SLaSh's z and its head at rates of their own.",
            "flag": "--head-lr",
            "cli_help": "peak learning rate of the task head (default: --lr's)",
        },
    )
    batch_size: int = field(
        default=32, metadata={"help": "examples per forward pass (micro-batch)."}
    )
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "micro-batches per optimizer step (logical batch = batch_size * grad_accum)."
        },
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "optimizer steps to run; takes precedence over epochs.",
            "cli_help": f"optimizer steps (default {DEFAULT_MAX_STEPS} unless --epochs)",
        },
    )
    epochs: float | None = field(
        default=None, metadata={"help": "passes over the training data, when max_steps is not set."}
    )
    warmup_ratio: float = field(
        default=0.06,
        metadata={
            "help": "fraction of the steps with linear warmup, before --lr-schedule's decay."
        },
    )
    lr_schedule: str = field(
        default="linear",
        metadata={
            "help": "how the learning rate moves after the warmup: linear or cosine decay to "
            "zero at the last step, or constant.",
            "choices": LR_SCHEDULES,
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    eval_every: int = field(
        default=250,
        metadata={"help": "evaluate on the dev set every N steps (0: only at the end)."},
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "write a checkpoint every N steps (0: never)."}
    )
    log_every: int = field(
        default=10,
        metadata={"help": "write a loss line to the JSONL log every N steps.", "cli": False},
    )
    eval_batch_size: int = field(
        default=64, metadata={"help": "batch size for evaluation.", "cli": False}
    )
    seed: int = field(
        default=0, metadata={"help": "seeds the data order, initialisation and dropout."}
    )
    progress: bool = field(
        default=True,
        metadata={
            "help": "show a progress bar.",
            "flag": "--no-progress",
            "cli_help": "hide the progress bar",
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batch examples of similar length together (less padding, faster); off: "
            "uniformly shuffled batches.",
            "flag": "--no-group-by-length",
            "cli_help": "uniformly shuffled batches instead of batches of similar length "
            "(more padding)",
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "activation checkpointing: keep only each transformer block's input and "
            "recompute the block in the backward pass (less memory, a second forward pass of "
            "every block; the same numbers). Non-reentrant, so it works across processes and "
            "with methods whose parameters some steps leave unused.",
            "cli_help": "recompute each transformer block in the backward pass instead of "
            "keeping its activations (less memory, a second forward pass, the same numbers)",
        },
    )

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise MicrotuneError("set a training length: --max-steps N or --epochs E")
        if self.max_steps is not None and self.max_steps < 1:
            raise MicrotuneError(f"--max-steps must be at least 1, got {self.max_steps}")
        # `not x > 0` (rather than `x <= 0`) also refuses NaN; inf is refused by name.
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise MicrotuneError(f"--epochs must be positive and finite, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise MicrotuneError("--batch-size and --grad-accum must be at least 1")
        if self.eval_batch_size < 1:
            raise MicrotuneError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        for flag, lr in (("--lr", self.learning_rate), ("--head-lr", self.head_learning_rate)):
            if lr is not None and not 0 < lr <= MAX_RATE:
                raise MicrotuneError(f"{flag} must be positive and at most {MAX_RATE:g}, got {lr}")
        if not 0 <= self.weight_decay <= MAX_RATE:
            raise MicrotuneError(
                f"--weight-decay must be in [0, {MAX_RATE:g}] (0: none), got {self.weight_decay}"
            )
        check_seed("--seed", self.seed)
        if self.eval_every < 0 or self.checkpoint_every < 0 or self.log_every < 1:
            raise MicrotuneError(
                "--eval-every and --checkpoint-every must be >= 0 (0: off), log_every >= 1"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise MicrotuneError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise MicrotuneError(
                f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )

    def check_logical_batch(self, num_examples: int) -> None:
        """Refuse accumulation past the training set: the extra micro-batches would be empty,
        so the run would silently use fewer than --grad-accum of them."""
        logical = self.batch_size * self.grad_accum
        if self.grad_accum > 1 and logical > num_examples:
            raise MicrotuneError(
                f"--batch-size {self.batch_size} x --grad-accum {self.grad_accum} = {logical} "
                f"examples per step, more than the {num_examples} training examples; use "
                f"--grad-accum {max(1, num_examples // self.batch_size)} or less"
            )

    def steps_for(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run, for a sampler with this many logical batches per epoch."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * batches_per_epoch))

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps with the default sampler (logical batch = batch_size * grad_accum)."""
        return self.steps_for(math.ceil(num_examples / (self.batch_size * self.grad_accum)))
