"""The trainer: a short loop over plug-ins, with evaluation, logging, checkpoints and resume.

It trains whatever parameters of the model require gradients and never knows which method
produced them; its settings are `trainconfig.TrainConfig`. Three plug-ins shape a run: a
sampler (which examples form each logical batch, a pure function of (seed, epoch)), a step (how
a logical batch, cut into micro-batches, becomes an update: `AdamWStep` here, `privacy.DPStep`
for DP-SGD) and callbacks (`TrainerCallback`: evaluation, logging, progress, checkpoints, early
stop). A trainer plug-in (`PluginBuilder`, e.g. `privacy.PrivacyPlugin`) supplies any of them
for a run and what the run records of it (`Plugins`); `api.train` takes a list of them.

The step also guards the numerics: a non-finite loss, gradient or parameter ends the run with a
`MicrotuneError` naming the step, so nothing diverged is ever saved as an artifact.

A checkpoint is one safetensors file (tensors plus JSON metadata), written atomically, that
holds everything needed to continue bit for bit: the trainable tensors, what the step owns
(optimizer state; DP's noise generator), the RNG state and the position in the data stream.

Under `torchrun` or `accelerate launch` (a `distributed.World` of several processes) every
process draws the same logical batches and trains on its share (`World.shard`); the step sums
the gradients of the trainable tensors over the processes (one all-reduce) before the update,
so every process holds the same parameters. Rank 0 alone logs, evaluates, shows progress and
writes checkpoints (holding every rank's RNG state); its decision to stop is everyone's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from microtune.data import Encoded, batches, epoch_order
from microtune.distributed import SINGLE, World
from microtune.errors import MicrotuneError
from microtune.files import CHECKPOINT_FILE, LOG_FILE, write_tensors
from microtune.taskspec import Task
from microtune.tasktypes import loss_for, loss_units_for, type_of
from microtune.trainconfig import TrainConfig

# Settings that may differ between a run and its resumption: they do not change the result.
# (Activation checkpointing recomputes the same blocks: it changes memory, not the numbers, so a
# run that ran out of memory may resume with it on.)
_RESUMABLE = (
    "progress",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "eval_batch_size",
    "gradient_checkpointing",
)


def evaluate(
    model: nn.Module,
    task: Task,
    rows: Sequence[Encoded],
    labels: Sequence,
    pad_token_id: int,
    batch_size: int = 64,
    tokenizer: Any = None,
) -> dict[str, float | None]:
    """The task's metrics on these rows, by its task type (`TaskType.evaluate`: by default
    `score` of `predict`'s outputs, refused when not finite); `tokenizer` for types that read
    generated text back (the causal LM's exact match)."""
    return type_of(task).evaluate(model, task, rows, labels, pad_token_id, batch_size, tokenizer)


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class Diverged(MicrotuneError):
    """A step met a non-finite loss, gradient or parameter; the trainer names the step.

    Attributes:
        before_update: found before this step's update (the loss or a gradient), so at the
            first step the learning rate cannot be the cause.
    """

    def __init__(self, problem: str, before_update: bool = False):
        super().__init__(problem)
        self.problem = problem
        self.before_update = before_update


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (stays on the device)."""
    flags = [tensor.isfinite().all() for tensor in tensors]
    return torch.stack(flags).all() if flags else torch.tensor(True)


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


# -- plug-ins: what a run adds to the plain loop --------------------------------------------


@dataclass
class Plugins:
    """What one trainer plug-in adds to a run; any part may be left out.

    Attributes:
        sampler: which examples form each logical batch (at most one plug-in of a run sets it).
        step: how a logical batch becomes an update (at most one plug-in sets it).
        callbacks: watch or steer the loop, before the built-in ones.
        record: after training, the JSON record of the plug-in (stored under its builder's
            name in microtune.json and metrics.json), or None to record nothing.
    """

    sampler: Sampler | None = None
    step: AdamWStep | None = None
    callbacks: Sequence[TrainerCallback] = ()
    record: Callable[[], dict[str, Any] | None] | None = None


class PluginBuilder(Protocol):
    """Builds a trainer plug-in for one run, once the task model and the training set are known.

    Attributes:
        name: the key of its settings in the run signature (a resume with other settings is
            refused) and of its record in microtune.json and metrics.json.
        headline: keys of its record that metrics.json also shows at the top (privacy: epsilon).
    """

    name: str
    headline: tuple[str, ...]

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the one that wrote the checkpoint."""
        ...

    def build(self, model: nn.Module, config: TrainConfig, num_examples: int) -> Plugins:
        """The run's plug-in (refuse here, before any step, what it cannot train)."""
        ...


def combine_plugins(built: Sequence[Plugins]) -> Plugins:
    """One set of trainer plug-ins from several; two that both set the sampler or the step are
    refused, since a run has one of each."""
    samplers = [p.sampler for p in built if p.sampler is not None]
    steps = [p.step for p in built if p.step is not None]
    if len(samplers) > 1 or len(steps) > 1:
        raise MicrotuneError("two trainer plug-ins both set the sampler or the step; use one")
    return Plugins(
        sampler=samplers[0] if samplers else None,
        step=steps[0] if steps else None,
        callbacks=[c for p in built for c in p.callbacks],
    )


# -- samplers: which examples form each logical batch ------------------------------------------


class Sampler(Protocol):
    """Logical batches (lists of example indices) of one epoch: a pure function of the epoch
    and the sampler's seed, so a resumed run replays exactly the batches of an uninterrupted one."""

    @property
    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int) -> list[list[int]]: ...


@dataclass(frozen=True)
class ShuffledSampler:
    """The seeded epoch order (`data.epoch_order`) cut into batches of `batch_size`.

    Attributes:
        num_examples: size of the training set.
        batch_size: examples per logical batch.
        seed: seeds the order of every epoch.
        drop_last: drop each epoch's last, smaller batch (fixed-size batches).
    """

    num_examples: int
    batch_size: int
    seed: int
    drop_last: bool = False

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.num_examples // self.batch_size)
        return math.ceil(self.num_examples / self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        order = epoch_order(self.num_examples, self.seed, epoch)
        size = self.batch_size
        return [order[i * size : (i + 1) * size] for i in range(self.batches_per_epoch)]


@dataclass(frozen=True)
class LengthGroupedSampler:
    """Shuffled batches of examples of similar length, so little of each batch is padding.

    The seeded epoch order is cut into groups of `group_batches` batches; each group is sorted
    by length and cut into batches, and the batches of the epoch are shuffled (seeded). Every
    example still appears once per epoch and each batch is drawn from a random group of the
    data, as in the `group_by_length` of `transformers`' Trainer; on SST-2 a batch of 32 pads to
    a third of the tokens of a random one.

    Attributes:
        lengths: token count of every training example.
        batch_size: examples per logical batch.
        seed: seeds the order of every epoch.
        group_batches: batches per sorted group (larger: less padding, less randomness).
    """

    lengths: tuple[int, ...]
    batch_size: int
    seed: int
    group_batches: int = 50

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        order = epoch_order(len(self.lengths), self.seed, epoch)
        size, group = self.batch_size, self.batch_size * self.group_batches
        out = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: -self.lengths[i])
            out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        shuffle = epoch_order(len(out), self.seed + 1, epoch)
        return [out[i] for i in shuffle]


def default_sampler(config: TrainConfig, rows: Sequence[Encoded], processes: int = 1) -> Sampler:
    """Logical batches of batch_size * grad_accum per process: length-grouped unless switched
    off (each process's share of a length-grouped batch is length-grouped too)."""
    size = config.batch_size * config.grad_accum * processes
    if config.group_by_length:
        lengths = tuple(len(row["input_ids"]) for row in rows)
        return LengthGroupedSampler(lengths, size, config.seed)
    return ShuffledSampler(len(rows), size, config.seed)


# -- steps: how a logical batch becomes an update ----------------------------------------------


class AdamWStep:
    """The plain step: the mean loss of the logical batch, backward, AdamW, warmup/linear decay.

    Subclasses change `gradients` (DP-SGD) or `train_mode`; a step owns the checkpoint entries
    of what it adds (`state` / `load_state`). With several processes (`world`) each step sees
    this process's share of the logical batch and sums over the processes before the update.
    `slice_of` makes a run one slice of a longer schedule (a federated client's round): its
    steps take the rates of steps start, start + 1, ... of a `span`-step warmup/decay.
    """

    schedule_slice: tuple[int, int] | None = None  # (start, span)

    def slice_of(self, start: int, span: int) -> AdamWStep:
        """Follow steps start.. of a `span`-step schedule instead of one of this run's own."""
        if not 0 <= start < span:
            raise MicrotuneError(f"a schedule slice must start in [0, {span}), got {start}")
        self.schedule_slice = (start, span)
        return self

    def bind(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        config: TrainConfig,
        total_steps: int,
        world: World = SINGLE,
    ) -> None:
        """Called once by the trainer, before any step: create the optimizer and schedule."""
        self.parameters = parameters
        self.world = world
        self.optimizer = torch.optim.AdamW(
            parameters.values(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        start, span = self.schedule_slice or (0, total_steps)
        factor = linear_schedule(int(config.warmup_ratio * span), span)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: factor(start + step)
        )

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in the mode its training forward passes run in."""
        model.train()

    def gradients(self, model: nn.Module, micro_batches: Iterable, logical_size: int) -> float:
        """Fill `.grad` with the gradient of the logical batch's mean loss; return that loss.

        The mean is over what the loss averages (`TaskType.loss_units`: examples, or scored
        tokens), over every micro-batch of every process: each micro-batch's loss is weighed
        by its units, and the sum over the processes divided by theirs, so the cut of the
        logical batch (`logical_size` examples in all) changes nothing but rounding.
        """
        units_of = loss_units_for(model)
        loss_sum, units = 0.0, 0
        for inputs, labels in micro_batches:
            count = units_of(labels)
            loss = loss_for(model)(model(**inputs), labels)
            (loss * count).backward()
            loss_sum += loss.item() * count
            units += count
        return self.average_gradients(loss_sum, units)

    def average_gradients(self, loss_sum: float, units: int) -> float:
        """Sum the gradients (of loss sums) and units over the processes in one all-reduce,
        divide; return the mean loss. A tensor no process gave a gradient keeps none."""
        params = list(self.parameters.values())
        if self.world.size == 1:  # in place: no second copy of the gradients
            for parameter in params:
                if parameter.grad is not None:
                    parameter.grad.div_(max(units, 1))
            return loss_sum / max(units, 1)
        device = params[0].device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        stats = torch.tensor([loss_sum, float(units)], dtype=torch.float64, device=device)
        *grads, present, stats = self.world.all_reduce_sum([*grads, present, stats])
        loss_sum, units = stats.tolist()
        for parameter, grad, given in zip(params, grads, present.tolist(), strict=True):
            parameter.grad = grad / max(units, 1.0) if given else None
        return loss_sum / max(units, 1.0)

    def __call__(self, model: nn.Module, micro_batches: Iterable, logical_size: int) -> float:
        loss = self.gradients(model, micro_batches, logical_size)
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss}", before_update=True)
        # The numerics guard: one flag for the gradients before the update and one for the
        # parameters after it, read together (one device sync per step, none per tensor). A
        # bad update is harmless here: the error below ends the run before anything is saved.
        grads_ok = all_finite(p.grad for p in self.parameters.values() if p.grad is not None)
        self.optimizer.step()
        self.scheduler.step()
        params_ok = all_finite(self.parameters.values())
        self.optimizer.zero_grad(set_to_none=True)
        grads_ok, params_ok = torch.stack([grads_ok.to(params_ok.device), params_ok]).tolist()
        if not grads_ok:
            raise Diverged("a gradient is not finite", before_update=True)
        if not params_ok:
            raise Diverged("a trainable parameter is not finite after the update")
        return loss

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) this step adds to a checkpoint."""
        state = self.optimizer.state_dict()
        tensors = {
            f"optim.{index}.{key}": torch.as_tensor(value)
            for index, values in state["state"].items()
            for key, value in values.items()
        }
        meta = {"param_groups": state["param_groups"], "schedule_step": self.scheduler.last_epoch}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        optimizer_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.last_epoch = meta["schedule_step"]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


# -- callbacks ---------------------------------------------------------------------------------


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
        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.step,
            disable=not (trainer.config.progress and trainer.world.is_main),
            # Say up front how much one step is, so a long accumulation is not a silent wait.
            desc=f"train ({trainer.config.batch_size}x{trainer.config.grad_accum} per step)"
            if trainer.config.grad_accum > 1
            else "train",
            unit="step",
            dynamic_ncols=True,
            # In a log file (no terminal) every redraw is a new line: redraw rarely there.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self.bar.update(1)
        postfix = {"loss": f"{logs['loss']:.4f}"}
        if trainer.last_metrics.get(trainer.main_metric) is not None:
            postfix[trainer.main_metric] = f"{trainer.last_metrics[trainer.main_metric]:.4f}"
        postfix.update({k: str(v) for k, v in trainer.live.items()})
        self.bar.set_postfix(postfix)

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


class CheckpointCallback(TrainerCallback):
    """An atomic checkpoint every `checkpoint_every` steps (not at the last: the artifact is)."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        every = trainer.config.checkpoint_every
        if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
            trainer.save_checkpoint()


# -- the trainer -------------------------------------------------------------------------------


def resume_signature(run_signature: dict | None, config: TrainConfig, world: World) -> dict:
    """What must not change between a run and its resumption (method, head, base model...)."""
    return {
        **(run_signature or {}),
        "train_config": {k: v for k, v in asdict(config).items() if k not in _RESUMABLE},
        # Each process's RNG state and data share depend on how many there are.
        **({"processes": world.size} if world.size > 1 else {}),
    }


class Trainer:
    """Trains `model` (its parameters that require grad) on encoded rows and labels.

    Plug-ins: `sampler` (which examples form each logical batch; default: the shuffled epoch
    order in batches of batch_size * grad_accum), `step` (how a logical batch, cut into
    micro-batches of batch_size, becomes an update; default `AdamWStep`) and `callbacks`
    (run before the built-in evaluation, logging, progress and checkpoint callbacks).
    `world`: the processes that train together (`distributed.World`; default: this one).
    """

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
        *,
        sampler: Sampler | None = None,
        step: AdamWStep | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        world: World = SINGLE,
    ):
        self.model = model
        self.world = world
        self.config = config
        self.rows = train_rows
        self.labels = train_labels
        self.pad_token_id = pad_token_id
        self.output_dir = Path(output_dir)
        self.evaluate_fn = evaluate_fn
        self.main_metric = main_metric
        self.run_signature = resume_signature(run_signature, config, world)
        if config.learning_rate is None:
            raise MicrotuneError("TrainConfig.learning_rate is not set (api.train fills it in)")
        self.parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.parameters:
            raise MicrotuneError("the model has no trainable parameters")
        if sampler is None:
            config.check_logical_batch(len(train_rows))
        self.sampler = sampler or default_sampler(config, train_rows, world.size)
        self.total_steps = config.steps_for(self.sampler.batches_per_epoch)
        self.step_plugin = step or AdamWStep()
        self.step_plugin.bind(model, self.parameters, config, self.total_steps, world)
        self.checkpointed = (
            enable_activation_checkpointing(model) if config.gradient_checkpointing else []
        )
        if self.checkpointed:
            self.train_mode()  # refuses a step that trains in eval mode, before any step
        evaluation = [EvaluateCallback()] if evaluate_fn else []
        self.callbacks = [
            *callbacks,
            *evaluation,
            LogCallback(),
            ProgressCallback(),
            CheckpointCallback(),
        ]
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # position inside the current epoch, in logical batches
        self.last_metrics: dict[str, float] = {}
        self.evaluated_at: int | None = None
        self.live: dict[str, Any] = {}  # values callbacks show in log lines and the progress bar
        self.stop_reason: str | None = None

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

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        """Every rank gives its RNG state; rank 0 writes the checkpoint."""
        rng = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
            rng["rng.cuda"] = torch.cuda.get_rng_state()
        every_rng = self.world.gather(rng)
        if not self.world.is_main:
            return
        step_tensors, step_meta = self.step_plugin.state()
        tensors = {f"model.{n}": p for n, p in self.parameters.items()}
        tensors.update({f"step.{k}": v for k, v in step_tensors.items()})
        for rank, states in enumerate(every_rng):
            tensors.update({_rank_key(key, rank): state for key, state in states.items()})
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step_plugin": step_meta,
            "param_shapes": {n: list(p.shape) for n, p in self.parameters.items()},
            "run_signature": self.run_signature,
            "last_metrics": self.last_metrics,
        }
        write_tensors(self.checkpoint_path, tensors, metadata={"json": json.dumps(meta)})

    def load_checkpoint(self) -> None:
        try:
            meta, tensors = self._read_checkpoint()
        except Exception as error:  # whatever a torn or edited file raises: one line
            raise _unreadable(self.checkpoint_path, error) from None
        changed = _differences(meta["run_signature"], self.run_signature)
        if changed or meta["param_shapes"] != {
            n: list(p.shape) for n, p in self.parameters.items()
        }:
            raise MicrotuneError(
                f"{self.checkpoint_path} was written by a run with other settings "
                f"({', '.join(changed) or 'trainable parameters'}); resume with the same "
                "command, or pass --overwrite to start over"
            )
        try:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(tensors[f"model.{name}"])
            step_tensors = {
                k[len("step.") :]: v for k, v in tensors.items() if k.startswith("step.")
            }
            self.step_plugin.load_state(step_tensors, meta["step_plugin"])
            torch.set_rng_state(tensors[_rank_key("rng.torch", self.world.rank)])
            cuda_rng = _rank_key("rng.cuda", self.world.rank)
            if cuda_rng in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors[cuda_rng])
        except Exception as error:  # an edited file: entries of the wrong shape or type
            raise _unreadable(self.checkpoint_path, error) from None
        self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
        self.batch_in_epoch = int(meta["batch_in_epoch"])
        self.last_metrics = meta["last_metrics"]

    def _read_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(metadata, tensors) of the checkpoint, with every entry resuming needs present."""
        with safe_open(self.checkpoint_path, framework="pt") as handle:
            meta = json.loads(handle.metadata()["json"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        keys = ("step", "epoch", "batch_in_epoch", "step_plugin", "param_shapes")
        missing = [k for k in (*keys, "run_signature", "last_metrics") if k not in meta]
        needed = (_rank_key("rng.torch", self.world.rank), *(f"model.{n}" for n in self.parameters))
        missing += [k for k in needed if k not in tensors]
        if missing:
            raise ValueError(f"missing {', '.join(missing[:3])}")
        return meta, tensors

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

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to the end (or continue from the checkpoint); returns the final dev metrics
        (rank 0's: the other processes do not evaluate)."""
        main = self.world.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 decides, so that all resume or none (each reads the checkpoint itself).
        if self.world.from_main(resume and self.checkpoint_path.is_file()):
            self.load_checkpoint()
            if main:
                _trim_log(self.output_dir / LOG_FILE, self.step)
        elif main and (self.output_dir / LOG_FILE).exists():
            (self.output_dir / LOG_FILE).unlink()
        # Every process starts from rank 0's tensors, as DDP does.
        self.world.broadcast_tensors(list(self.parameters.values()))
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


def _unreadable(path: Path, error: Exception) -> MicrotuneError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return MicrotuneError(
        f"checkpoint {path} is unreadable ({reason}); "
        "pass --overwrite instead of --resume to start over"
    )


def _trim_log(path: Path, step: int) -> None:
    """After a resume, drop log lines from steps the crashed run did past its checkpoint."""
    if path.is_file():
        kept = [
            line
            for line in path.read_text().splitlines()
            if _log_step(line) is not None and _log_step(line) <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))


def _rank_key(key: str, rank: int) -> str:
    """A per-rank checkpoint entry's name; rank 0 keeps the one-process name."""
    return key if rank == 0 else f"{key}.{rank}"


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
