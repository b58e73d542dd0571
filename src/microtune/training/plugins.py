"""Trainer plug-ins from outside the trainer: a `PluginBuilder` (e.g. `privacy.PrivacyPlugin`)
supplies a run's sampler, step and callbacks and what the run records of it (`Plugins`);
`api.train` takes a list of them (`combine_plugins`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from microtune.errors import MicrotuneError
from microtune.training.callbacks import TrainerCallback
from microtune.training.config import TrainConfig
from microtune.training.samplers import Sampler
from microtune.training.steps import AdamWStep


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


@runtime_checkable
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
