"""The settings of differentially private training (`DPConfig`), free of torch so that the
command line builds its --dp-* options from this dataclass without loading the heavy stack."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from microtune.common.checks import check_seed
from microtune.errors import MicrotuneError

SAMPLINGS = ("poisson", "shuffle")
ACCOUNTANTS = ("prv", "rdp")
# Bounds on what the accountants are asked (issue 23: unbounded values hung or ran out of
# memory inside Opacus). Past ε 100 a DP guarantee says nothing; σ up to Opacus' MAX_SIGMA.
EPSILON_MAX = 100.0
SIGMA_MIN, SIGMA_MAX = 0.1, 1e6
STEPS_MAX = 10**7


@dataclass
class DPConfig:
    """Differential privacy settings (DP-SGD). Training is private when epsilon or sigma is set.

    Each field's help text is in its metadata (with "choices" where the values are fixed); the
    command line's --dp-* options are generated from it.
    """

    epsilon: float | None = field(
        default=None,
        metadata={
            "help": "target ε. σ is calibrated so the planned steps spend at most this, and "
            "training stops before a step would exceed it."
        },
    )
    delta: float | None = field(
        default=None, metadata={"help": "target δ (default 1/(2N) for N training examples)."}
    )
    sigma: float | None = field(
        default=None,
        metadata={
            "help": "noise multiplier σ to use instead of calibrating one; with epsilon also set, "
            "training stops before the budget runs out."
        },
    )
    clip: float = field(
        default=1.0,
        metadata={
            "help": "per-example L2 clipping norm C, flat over every trainable tensor "
            "(head included)."
        },
    )
    batch: int = field(
        default=2048,
        metadata={
            "help": "logical batch size: the expected size for Poisson sampling (rate q = batch / "
            "N), the fixed size for shuffled batches. Noise is added once per logical batch; the "
            "micro-batch (--batch-size) only bounds memory. 2048 as in the seed paper's private "
            "setting: large batches average the noise away."
        },
    )
    sampling: str = field(
        default="poisson",
        metadata={
            "help": '"poisson" (each example joins each batch independently with rate q: what the '
            'accountant assumes, exact) or "shuffle" (fixed-size batches of a shuffled epoch: an '
            "approximation, reported as such).",
            "choices": SAMPLINGS,
        },
    )
    accountant: str = field(
        default="prv",
        metadata={
            "help": '"prv" (Opacus\' PRV accountant, tight) or "rdp" (Rényi DP, looser).',
            "choices": ACCOUNTANTS,
        },
    )
    noise_seed: int | None = field(
        default=None,
        metadata={
            "help": "seed of the noise generator, for reproducible runs and tests only: whoever "
            "knows it can remove the noise. Default: drawn from the operating system's secure "
            "randomness and never written anywhere but the checkpoint."
        },
    )

    def __post_init__(self) -> None:
        if self.epsilon is None and self.sigma is None:
            raise MicrotuneError("DP training needs a target epsilon or a noise multiplier sigma")
        for flag, value in (("--dp-epsilon", self.epsilon), ("--dp-sigma", self.sigma)):
            if value is not None and not math.isfinite(value):
                raise MicrotuneError(f"{flag} must be a finite number, got {value}")
        if not math.isfinite(self.clip):
            raise MicrotuneError(f"--dp-clip must be a finite number, got {self.clip}")
        if self.noise_seed is not None:
            check_seed("--dp-noise-seed", self.noise_seed)
        if self.epsilon is not None and not self.epsilon > 0:
            raise MicrotuneError(f"DP epsilon must be positive, got {self.epsilon}")
        if self.epsilon is not None and self.epsilon > EPSILON_MAX:
            raise MicrotuneError(
                f"--dp-epsilon {self.epsilon} is above {EPSILON_MAX:g}, where a DP guarantee says "
                "nothing; choose a smaller target (1 to 10 is usual)"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise MicrotuneError(f"DP delta must be in (0, 1), got {self.delta}")
        if self.sigma is not None and not SIGMA_MIN <= self.sigma <= SIGMA_MAX:
            raise MicrotuneError(
                f"--dp-sigma must be in [{SIGMA_MIN}, {SIGMA_MAX:.0e}], got {self.sigma}"
            )
        if not self.clip > 0:
            raise MicrotuneError(f"DP clip norm must be positive, got {self.clip}")
        if self.batch < 1:
            raise MicrotuneError(f"DP logical batch must be at least 1, got {self.batch}")
        if self.sampling not in SAMPLINGS:
            raise MicrotuneError(f"DP sampling '{self.sampling}' unknown; use {SAMPLINGS}")
        if self.accountant not in ACCOUNTANTS:
            raise MicrotuneError(f"DP accountant '{self.accountant}' unknown; use {ACCOUNTANTS}")
