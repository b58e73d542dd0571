"""Steps: how a logical batch, cut into micro-batches, becomes an update. `AdamWStep` is the
plain one (`privacy.DPStep` the DP-SGD one): the mean loss (`AdamWStep.loss`, the task type's
by default), backward, AdamW on a warmup-then-decay schedule (`lr_schedule`; `slice_of` makes
a run one slice of a longer one).

The step also guards the numerics: a non-finite loss, gradient or parameter raises `Diverged`,
which the trainer turns into a `MicrotuneError` naming the step, so nothing diverged is ever
saved as an artifact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.tasks.types import loss_for, loss_units_for
from microtune.training.config import TrainConfig
from microtune.training.distributed import SINGLE, World

HEAD_PREFIX = "head."  # `TaskModel.head`'s parameters in `named_parameters()`


# The rate's factor after the warmup, `done` of the `span` decay steps gone: the linear one
# is written (span - done) / span so that it stays bit for bit what runs recorded before.
DECAYS: dict[str, Callable[[int, int], float]] = {
    "linear": lambda done, span: max(0.0, (span - done) / span),
    "cosine": lambda done, span: 0.5 * (1.0 + math.cos(math.pi * min(1.0, done / span))),
    "constant": lambda done, span: 1.0,
}


def lr_schedule(
    warmup_steps: int, total_steps: int, name: str = "linear"
) -> Callable[[int], float]:
    """The learning rate's factor at each step: a linear warmup to 1, then `name`'s decay
    (`DECAYS`: linear or cosine to zero at `total_steps`, or constant)."""
    decay = DECAYS[name]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return decay(step - warmup_steps, max(1, total_steps - warmup_steps))

    return factor


def parameter_groups(parameters: dict[str, nn.Parameter], config: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: one, or the task head's (`head.*`) apart at its own rate."""
    if config.head_learning_rate is None:
        return [{"params": list(parameters.values())}]
    head = [p for name, p in parameters.items() if name.startswith(HEAD_PREFIX)]
    rest = [p for name, p in parameters.items() if not name.startswith(HEAD_PREFIX)]
    groups = [{"params": rest}] if rest else []
    return groups + ([{"params": head, "lr": config.head_learning_rate}] if head else [])


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


class AdamWStep:
    """The plain step: the mean loss of the logical batch, backward, AdamW, warmup/linear decay.

    Subclasses change `loss` (what one micro-batch minimises: a federated party's logit
    adjustment), `gradients` (DP-SGD; FedProx's proximal term) or `train_mode`; a step owns the
    checkpoint entries of what it adds (`state` / `load_state`). With several processes
    (`world`) each step sees this process's share of the logical batch and sums over the
    processes before the update.
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
            parameter_groups(parameters, config),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        start, span = self.schedule_slice or (0, total_steps)
        factor = lr_schedule(int(config.warmup_ratio * span), span, config.lr_schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: factor(start + step)
        )

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in the mode its training forward passes run in."""
        model.train()

    def loss(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch's outputs: the model's own (`TaskModel.loss`, its
        task type's), averaged over `TaskType.loss_units`."""
        return loss_for(model)(logits, labels)

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
            loss = self.loss(model, model(**inputs), labels)
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
