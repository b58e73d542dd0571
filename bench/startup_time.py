"""How fast the command line starts, against the cost of importing the heavy stack.

Measures, in one run, the median wall time of 5 runs each (a fresh interpreter per run, as a
subprocess) of:

- `python -c "import torch, transformers"`: the yardstick, what every command paid before the
  command line was split into torch-free layers;
- `microtune --help`, `microtune train --help`: building the whole parser (every method's
  options included) and printing help;
- `microtune accountant --epsilon 8 --delta 1e-5 --sample-rate 0.01 --steps 100`: a command
  that needs no model (it does load the accountant's own library, Opacus).

and prints each time with its ratio to the yardstick (the goal: at most 0.25). The commands run
as `python -m microtune` with this interpreter and the repository's `src` first on the path, so
they time the working tree.

    python bench/startup_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.25
YARDSTICK = ("import torch, transformers", ["-c", "import torch, transformers"])
COMMANDS = (
    ("microtune --help", ["-m", "microtune", "--help"]),
    ("microtune train --help", ["-m", "microtune", "train", "--help"]),
    (
        "microtune accountant ...",
        ["-m", "microtune", "accountant", "--epsilon", "8", "--delta", "1e-5"]
        + ["--sample-rate", "0.01", "--steps", "100"],
    ),
)


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def wall_time(args: list[str]) -> float:
    """Seconds from start to exit of `python <args>` in a fresh interpreter; it must succeed."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *args], env=environment(), capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"python {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds


def median_time(args: list[str], runs: int) -> float:
    wall_time(args)  # a first run warms the file cache; not counted
    return statistics.median(wall_time(args) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median)")
    runs = parser.parse_args().runs
    print(f"median of {runs} runs each, fresh interpreter ({sys.executable})")
    name, args = YARDSTICK
    base = median_time(args, runs)
    print(f"{name:<28} {base:7.3f} s  (yardstick)")
    worst = 0.0
    for name, args in COMMANDS:
        seconds = median_time(args, runs)
        ratio = seconds / base
        worst = max(worst, ratio)
        verdict = "ok" if ratio <= GOAL else f"over the goal of {GOAL}"
        print(f"{name:<28} {seconds:7.3f} s  {ratio:5.2f} x yardstick  {verdict}")
    print(f"worst ratio {worst:.2f} (goal <= {GOAL})")


if __name__ == "__main__":
    main()
