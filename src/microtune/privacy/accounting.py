"""Privacy accounting with Opacus' maintained accountants (PRV, RDP): the ε of a noise
multiplier, and the noise multiplier of a target ε. Nothing here is hand-written accounting.

Every input is bounded before an accountant runs (issue 23): an unbounded σ, ε or step count
made Opacus spin forever or allocate exabytes. The PRV accountant's grid size is computed from
Opacus' own domain rule first and refused past `PRV_MAX_POINTS`; the σ search is a bounded
bisection. Opacus is imported when a number is asked for, not with this module, so the command
line's parser never pays for it.
"""

from __future__ import annotations

import math
import warnings

from microtune.errors import MicrotuneError
from microtune.privacy.config import ACCOUNTANTS, EPSILON_MAX, SIGMA_MAX, SIGMA_MIN, STEPS_MAX

PRV_EPS_ERROR = 0.01  # Opacus' PRVAccountant.get_epsilon default, which the grid rule below uses
PRV_MAX_POINTS = 3_000_000  # about 1 GB of working arrays in Opacus' FFT composition
SEARCH_ITERATIONS = 60  # bisection steps: 2^-60 of the bracket is below float resolution


def check_delta(delta: float, num_examples: int | None = None) -> None:
    """δ must be a probability below 1 and, with N examples, below 1/N (δ ≥ 1/N allows
    publishing one whole example outright)."""
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise MicrotuneError(f"delta must be in (0, 1), got {delta}; use e.g. 1/(2N)")
    if num_examples is not None and delta >= 1 / num_examples:
        raise MicrotuneError(
            f"delta {delta} is not below 1/N = 1/{num_examples}: it would allow leaking one "
            f"example outright; use at most {1 / (2 * num_examples):.3g} (1/(2N))"
        )


def _check_accounting(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise MicrotuneError(f"sample rate must be in (0, 1], got {sample_rate}")
    if not 1 <= steps <= STEPS_MAX:
        raise MicrotuneError(f"steps must be in [1, {STEPS_MAX:.0e}], got {steps}")
    check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise MicrotuneError(f"accountant '{accountant}' unknown; use {ACCOUNTANTS}")


def check_sigma(sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise MicrotuneError(f"sigma must be a positive finite number, got {sigma}")
    if not SIGMA_MIN <= sigma <= SIGMA_MAX:
        raise MicrotuneError(
            f"sigma {sigma} is outside [{SIGMA_MIN}, {SIGMA_MAX:.0e}], where the accountants "
            "give meaningful numbers; choose a sigma inside it"
        )


def check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise MicrotuneError(f"epsilon must be positive and finite, got {epsilon}")
    if epsilon > EPSILON_MAX:
        raise MicrotuneError(
            f"epsilon {epsilon} is above {EPSILON_MAX:g}, where a DP guarantee says nothing; "
            "choose a smaller target (1 to 10 is usual)"
        )


def _prv_grid_points(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """The size of the grid Opacus' PRV accountant would allocate (its own domain rule)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    prv = PoissonSubsampledGaussianPRV(sample_rate, sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = compute_safe_domain_size([prv], [steps], PRV_EPS_ERROR, delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return 2 * half / mesh


def _grid_too_large(points: float) -> MicrotuneError:
    return MicrotuneError(
        f"the PRV accountant would need a grid of {points:.3g} points (at most "
        f"{PRV_MAX_POINTS:.0e} fit in memory) for this sigma and step count; use --accountant "
        "rdp, a larger sigma, or fewer steps"
    )


def _epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str):
    from opacus.accountants import create_accountant

    if accountant == "prv":
        points = _prv_grid_points(sigma, sample_rate, steps, delta)
        if not points <= PRV_MAX_POINTS:
            raise _grid_too_large(points)
    account = create_accountant(mechanism=accountant)
    account.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" on tiny runs
        warnings.simplefilter("ignore")
        return float(account.get_epsilon(delta=delta))


def epsilon_spent(
    sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """ε after `steps` subsampled Gaussian steps, from Opacus' accountant (0 for no steps)."""
    if steps == 0:
        return 0.0
    _check_accounting(sample_rate, steps, delta, accountant)
    check_sigma(sigma)
    return _epsilon(sigma, sample_rate, steps, delta, accountant)


def calibrate_sigma(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The smallest σ (to a tolerance of 0.1% of ε) whose `steps` steps spend at most ε: Opacus'
    search (double σ from 20 until it spends at most ε, then bisect), bounded to [SIGMA_MIN,
    SIGMA_MAX] and SEARCH_ITERATIONS accountant calls. A σ whose PRV grid would not fit in
    memory counts as spending too much."""
    _check_accounting(sample_rate, steps, delta, accountant)
    check_epsilon(epsilon)
    low, high = SIGMA_MIN, 20.0
    while _epsilon(high, sample_rate, steps, delta, accountant) > epsilon:
        if high >= SIGMA_MAX:
            raise MicrotuneError(
                f"cannot reach epsilon={epsilon}: even sigma {SIGMA_MAX:.0e} spends more; raise "
                "epsilon or delta, or lower the sample rate or steps"
            )
        low, high = high, min(2 * high, SIGMA_MAX)
    for _ in range(SEARCH_ITERATIONS):
        middle = (low + high) / 2
        try:
            spent = _epsilon(middle, sample_rate, steps, delta, accountant)
        except MicrotuneError:  # the grid of a small σ: treat it as spending too much
            spent = math.inf
        if spent <= epsilon:
            high = middle
            if epsilon - spent <= 1e-3 * epsilon:
                break
        else:
            low = middle
    return high
