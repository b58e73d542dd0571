"""Privacy accounting with Opacus' maintained accountants (PRV, RDP): the ε of a noise
multiplier, and the noise multiplier of a target ε. Nothing here is hand-written accounting.

Opacus is imported when a number is asked for, not with this module, so the command line's
parser never pays for it.
"""

from __future__ import annotations

import warnings

from microtune.dpconfig import ACCOUNTANTS
from microtune.errors import MicrotuneError


def _check_accounting(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not 0 < sample_rate <= 1:
        raise MicrotuneError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise MicrotuneError(f"steps must be at least 1, got {steps}")
    if not 0 < delta < 1:
        raise MicrotuneError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise MicrotuneError(f"accountant '{accountant}' unknown; use {ACCOUNTANTS}")


def epsilon_spent(
    sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """ε after `steps` subsampled Gaussian steps, from Opacus' accountant (0 for no steps)."""
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    _check_accounting(sample_rate, steps, delta, accountant)
    if not sigma > 0:
        raise MicrotuneError(f"sigma must be positive, got {sigma}")
    account = create_accountant(mechanism=accountant)
    account.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" on tiny runs
        warnings.simplefilter("ignore", UserWarning)
        return float(account.get_epsilon(delta=delta))


def calibrate_sigma(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The smallest σ (to a tolerance of 0.1% of ε) whose `steps` steps spend at most ε."""
    from opacus.accountants.utils import get_noise_multiplier

    _check_accounting(sample_rate, steps, delta, accountant)
    if not epsilon > 0:
        raise MicrotuneError(f"epsilon must be positive, got {epsilon}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=1e-3 * epsilon,
                )
            )
    except ValueError as error:  # "The privacy budget is too low."
        raise MicrotuneError(f"cannot reach epsilon={epsilon}: {error}; raise it") from None
