"""Differentially private training (DP-SGD, methods.md §7): the one privacy engine.

What lives here (the user's settings are `dpconfig.DPConfig`, accounting is `accounting`):
`PrivacyPlugin` (the trainer plug-in `api.train` takes), `PrivacyPlan` (σ, δ, q and the step budget
resolved for one training set, accounted by Opacus' maintained PRV or RDP accountant),
`PoissonSampler` (the sampling the accountant assumes), `DPStep` (per-example gradients, flat
clipping, one Gaussian draw per logical batch, then AdamW) and `PrivacyBudgetCallback` (ε spent
in the log and progress bar; stops before the target would be exceeded).

Dropout: a DP step runs the model in eval mode, so backbone, head and LoRA dropout are off and
each example's gradient is a function of that example and the parameters alone.

Several processes (`torchrun`, `accelerate launch`): every process draws the same Poisson batch
and clips its own share's examples; the clipped sums are all-reduced and the noise is added
once, by rank 0 (as Opacus' distributed optimizer does), so the update, σ and ε are the
one-process run's, with the accountant at the global rate q = batch / N.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.privacy.accounting import calibrate_sigma, check_delta, epsilon_spent
from microtune.privacy.config import DPConfig
from microtune.privacy.per_example import check_supported, engine_for
from microtune.training.callbacks import TrainerCallback
from microtune.training.config import TrainConfig
from microtune.training.distributed import SINGLE, World
from microtune.training.plugins import Plugins
from microtune.training.samplers import ShuffledSampler
from microtune.training.steps import AdamWStep


@dataclass
class PrivacyPlan:
    """σ, δ, q and the budget of one private run, resolved from a DPConfig and the data size."""

    config: DPConfig
    num_examples: int
    planned_steps: int
    sigma: float
    delta: float

    @classmethod
    def resolve(cls, config: DPConfig, num_examples: int, planned_steps: int) -> PrivacyPlan:
        if config.batch > num_examples:
            raise MicrotuneError(
                f"DP logical batch {config.batch} exceeds the {num_examples} training examples; "
                "lower it"
            )
        delta = config.delta if config.delta is not None else 1 / (2 * num_examples)
        check_delta(delta, num_examples)
        sample_rate = config.batch / num_examples
        sigma = config.sigma
        if sigma is None:
            sigma = calibrate_sigma(
                config.epsilon, delta, sample_rate, planned_steps, config.accountant
            )
        return cls(config, num_examples, planned_steps, sigma, delta)

    @property
    def sample_rate(self) -> float:
        return self.config.batch / self.num_examples

    def epsilon(self, steps: int) -> float:
        return epsilon_spent(
            self.sigma, self.sample_rate, steps, self.delta, self.config.accountant
        )

    def allowed_steps(self) -> int | None:
        """The most steps whose ε stays within the target (None: no target, no limit); at least
        the planned steps are checked, so a calibrated plan costs one accountant call."""
        target = self.config.epsilon
        if target is None or self.epsilon(self.planned_steps) <= target:
            return None
        low, high = 0, self.planned_steps  # ε(low) <= target < ε(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.epsilon(middle) <= target else (low, middle)
        return low

    def record(self, steps: int) -> dict[str, Any]:
        """What metrics.json and the artifact record about the privacy of a run of `steps`."""
        c = self.config
        return {
            "epsilon": self.epsilon(steps),
            "target_epsilon": c.epsilon,
            "delta": self.delta,
            "sigma": self.sigma,
            "clip": c.clip,
            "sample_rate": self.sample_rate,
            "logical_batch": c.batch,
            "sampling": c.sampling,
            "sampling_exact": c.sampling == "poisson",
            "sampling_note": (
                "Poisson sampling, as the accountant assumes"
                if c.sampling == "poisson"
                else "APPROXIMATION: shuffled fixed-size batches accounted as Poisson sampling"
            ),
            "steps": steps,
            "planned_steps": self.planned_steps,
            "accountant": c.accountant,
            "noise_divisor": "expected logical batch size q*N"
            if c.sampling == "poisson"
            else "logical batch size",
            "dropout": "off",
            "noise_seed": c.noise_seed,  # None: secret, as privacy needs
        }


# -- the sampler -----------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(map(str, ("microtune", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class PoissonSampler:
    """Each example joins each logical batch independently with probability q = batch / N.

    Batch sizes vary (mean q·N). An "epoch" is N // batch logical batches drawn from a generator
    seeded by (seed, epoch): a pure function of (seed, epoch), so resume replays them.
    """

    num_examples: int
    expected_batch: int
    seed: int

    @property
    def sample_rate(self) -> float:
        return self.expected_batch / self.num_examples

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_examples // self.expected_batch)

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(_seed("poisson", self.seed, epoch))
        draws = torch.rand(self.batches_per_epoch, self.num_examples, generator=generator)
        return [torch.nonzero(row < self.sample_rate).flatten().tolist() for row in draws]


# -- the step --------------------------------------------------------------------------------


class DPStep(AdamWStep):
    """DP-SGD's gradient, then the AdamW update of `AdamWStep`.

    Per logical batch: per-example gradients of every trainable tensor, each example's flat L2
    norm clipped to C, the clipped gradients summed, N(0, σ²C²) noise added once, and the sum
    divided by the expected logical batch size q·N (Poisson) or the fixed size (shuffle). The
    noise generator's state and the number of private steps go into checkpoints.
    """

    def __init__(self, plan: PrivacyPlan):
        super().__init__()
        self.plan = plan
        seed = plan.config.noise_seed
        self.noise = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else _seed("dp-noise", seed)
        )
        self.private_steps = 0
        self.per_example = None  # the per-example engine (microtune.privacy.per_example), at bind

    def bind(
        self,
        model: nn.Module,
        parameters,
        config: TrainConfig,
        total_steps: int,
        world: World = SINGLE,
    ) -> None:
        super().bind(model, parameters, config, total_steps, world)
        self.per_example = engine_for(model, parameters)  # refuses before any step

    def train_mode(self, model: nn.Module) -> None:
        model.eval()  # no dropout: an example's gradient depends on it and the parameters only

    def gradients(self, model: nn.Module, micro_batches: Iterable, logical_size: int) -> float:
        clip, sigma = self.plan.config.clip, self.plan.sigma
        sums = {name: torch.zeros_like(p) for name, p in self.parameters.items()}
        loss_sum, count = 0.0, 0
        for inputs, labels in micro_batches:
            losses, clipped = self.per_example.clipped_sum(inputs, labels, clip)
            for name, part in clipped.items():
                sums[name] += part
            loss_sum += float(losses.sum())
            count += len(losses)
        for name, parameter in self.parameters.items() if self.world.is_main else ():
            # Added once, to rank 0's share of the sum; drawn on the CPU in float32 in a fixed
            # order: the same noise on every device.
            noise = torch.randn(parameter.shape, generator=self.noise) * (sigma * clip)
            sums[name] += noise.to(device=parameter.device, dtype=parameter.dtype)
        device = next(iter(self.parameters.values())).device
        stats = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=device)
        *totals, stats = self.world.all_reduce_sum([*sums.values(), stats])
        for parameter, total in zip(self.parameters.values(), totals, strict=True):
            parameter.grad = total / self.plan.config.batch
        self.private_steps += 1
        loss_sum, count = stats.tolist()
        return loss_sum / max(count, 1)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        tensors["dp.noise_rng"] = self.noise.get_state()
        meta["private_steps"] = self.private_steps
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.noise.set_state(tensors["dp.noise_rng"])
        self.private_steps = meta["private_steps"]


class PrivacyBudgetCallback(TrainerCallback):
    """Logs ε spent (log lines and progress bar) and stops before a step would exceed the target."""

    def __init__(self, plan: PrivacyPlan, step: DPStep):
        self.plan = plan
        self.step = step
        self.allowed: int | None = None

    def on_train_begin(self, trainer) -> None:
        self.allowed = self.plan.allowed_steps()
        if self.allowed == 0:
            raise MicrotuneError(
                f"one step with sigma={self.plan.sigma:.4g} already spends more than "
                f"epsilon={self.plan.config.epsilon}; raise sigma or epsilon"
            )

    def on_step_begin(self, trainer) -> None:
        if self.allowed is not None and self.step.private_steps >= self.allowed:
            spent = self.plan.epsilon(self.step.private_steps)
            trainer.stop(
                f"privacy budget: epsilon {spent:.4f} spent; one more step would exceed the "
                f"target {self.plan.config.epsilon}"
            )

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None:
        if trainer.is_log_step():
            trainer.live["epsilon"] = round(self.plan.epsilon(self.step.private_steps), 4)


@dataclass(frozen=True)
class PrivacyPlugin:
    """DP-SGD as a trainer plug-in (`train.PluginBuilder`): its sampler, step and budget
    callback for a run, and the privacy record (ε spent, σ, δ, q, ...) of what it trained."""

    dp: DPConfig
    name: str = "privacy"
    headline: tuple[str, ...] = ("epsilon",)

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.dp)

    def build(self, model: nn.Module, config: TrainConfig, num_examples: int) -> Plugins:
        """Unsupported models are refused here, before any calibration or step."""
        check_supported(model)
        if config.grad_accum != 1:
            raise MicrotuneError(
                "--grad-accum does not apply to DP training: the logical batch is --dp-batch "
                "and --batch-size the micro-batch"
            )
        dp = self.dp
        if dp.sampling == "poisson":
            sampler = PoissonSampler(num_examples, dp.batch, config.seed)
        else:  # fixed size: drop the last, smaller batch of each epoch
            sampler = ShuffledSampler(num_examples, dp.batch, config.seed, drop_last=True)
        plan = PrivacyPlan.resolve(dp, num_examples, config.steps_for(sampler.batches_per_epoch))
        step = DPStep(plan)
        return Plugins(
            sampler=sampler,
            step=step,
            callbacks=[PrivacyBudgetCallback(plan, step)],
            record=lambda: plan.record(step.private_steps),
        )
