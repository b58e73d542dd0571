"""`microtune accountant`: the noise multiplier for a target epsilon, or the epsilon of a noise
multiplier; one JSON object. Torch-free: it runs without loading the training stack."""

from __future__ import annotations

import argparse
import math
from typing import Any

from microtune.errors import MicrotuneError
from microtune.privacy.config import ACCOUNTANTS, STEPS_MAX

TEXT = (
    "privacy accounting: the noise multiplier sigma for a target epsilon, or the epsilon of "
    "a sigma; prints one JSON object"
)


def add(commands) -> None:
    sub = commands.add_parser("accountant", help=TEXT, description=TEXT)
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon: prints the sigma it needs")
    target.add_argument("--sigma", type=float, help="noise multiplier: prints the epsilon spent")
    sub.add_argument("--delta", type=float, help="delta (default 1/(2N) with --num-examples N)")
    sub.add_argument("--num-examples", type=int, help="training set size N, for the default delta")
    sub.add_argument(
        "--sample-rate", type=float, required=True, help="sampling rate q = logical batch / N"
    )
    length = sub.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="number of noisy steps")
    length.add_argument(
        "--epochs", type=float, help="epochs, at floor(1/q) steps each (as the trainer counts)"
    )
    sub.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="accountant")


def _delta(args: argparse.Namespace) -> float:
    if args.delta is not None:
        return args.delta
    if args.num_examples is None or args.num_examples < 1:
        raise MicrotuneError("give --delta D, or --num-examples N for the default 1/(2N)")
    return 1 / (2 * args.num_examples)


def _steps(args: argparse.Namespace, q: float) -> int:
    if args.steps is not None:
        return args.steps
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise MicrotuneError(f"--epochs must be a positive finite number, got {args.epochs}")
    steps = args.epochs * max(1, math.floor(1 / q))
    if steps > STEPS_MAX:  # before ceil: an astronomic float is no int to count
        raise MicrotuneError(f"--epochs {args.epochs} gives {steps:.3g} steps; at most {STEPS_MAX}")
    return math.ceil(steps)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.privacy.accounting import calibrate_sigma, check_delta, epsilon_spent

    delta = _delta(args)
    if args.num_examples is not None:
        if args.num_examples < 1:
            raise MicrotuneError(f"--num-examples must be at least 1, got {args.num_examples}")
        check_delta(delta, args.num_examples)
    q = args.sample_rate
    if not (q is not None and math.isfinite(q) and 0 < q <= 1):
        raise MicrotuneError(f"--sample-rate must be in (0, 1], got {q}")
    steps = _steps(args, q)
    result = {"delta": delta, "sample_rate": q, "steps": steps, "accountant": args.accountant}
    if args.epsilon is not None:
        sigma = calibrate_sigma(args.epsilon, delta, q, steps, args.accountant)
        return {"sigma": sigma, "epsilon": args.epsilon, **result}
    epsilon = epsilon_spent(args.sigma, q, steps, delta, args.accountant)
    return {"epsilon": epsilon, "sigma": args.sigma, **result}
