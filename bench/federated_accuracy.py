"""Federated against centralised accuracy (issue #19): the dev metric of `microtune federate`
after R rounds beside `microtune train` of the same method over the same total steps
(rounds x clients per round x local steps), per Dirichlet alpha and seed, and their ratio.

    HF_HUB_OFFLINE=1 python bench/federated_accuracy.py --method slash --alpha 1 0.1 \
        --seeds 0 1 2 [--rounds 20] [--local-steps 5] [--clients 10] [--clients-per-round 3] \
        [--data-dir ../shared/data] [--federated-lr R] [-- options for both, e.g. --k 0.0005]

Runs the real commands (printed before each run) in fresh processes, one after the other,
into a scratch folder, and prints one JSON line per run and a table: per alpha, the mean over
seeds of each side, their ratio, and the worst seed's ratio to the centralised mean. A row
already in `--out` (its metrics.json) is read, not run again. `--federated-lr` gives the
federated runs a rate of their own (an average of parties' steps moves less than as many
steps in a row, so federated training may want a larger one; tune each side, say so).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def arguments() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="slash")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=3)
    parser.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--federated-lr", default=None, help="the federated runs' --lr")
    args, extra = parser.parse_known_args()
    return args, [option for option in extra if option != "--"]


def run(command: list[str], folder: Path) -> float:
    """The command's main dev metric (from its metrics.json), running it unless done."""
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(metrics.read_text())
    return float(next(iter(report["metrics"].values())))


def commands(args, extra: list[str], alpha: float, seed: int, out: Path) -> dict[str, list]:
    shared = ["--task", args.task, "--method", args.method, "--data-dir", args.data_dir]
    shared += ["--seed", str(seed), "--no-progress", *extra]
    total = args.rounds * args.clients_per_round * args.local_steps
    federated = ["microtune", "federate", *shared, "--alpha", str(alpha)]
    federated += ["--clients", str(args.clients), "--clients-per-round"]
    federated += [str(args.clients_per_round), "--rounds", str(args.rounds)]
    federated += ["--local-steps", str(args.local_steps)]
    if args.federated_lr is not None:
        federated += ["--lr", args.federated_lr]
    centralised = ["microtune", "train", *shared, "--max-steps", str(total), "--eval-every", "0"]
    return {
        "federated": federated + ["--output", str(out / f"fed-a{alpha}-s{seed}")],
        "centralised": centralised + ["--output", str(out / f"central-s{seed}")],
    }


def main() -> None:
    args, extra = arguments()
    out = Path(args.out or tempfile.mkdtemp(prefix="federated-accuracy-"))
    central: dict[int, float] = {}
    federated: dict[float, list[float]] = {}
    for alpha in args.alpha:
        for seed in args.seeds:
            runs = commands(args, extra, alpha, seed, out)
            if seed not in central:
                central[seed] = run(runs["centralised"], Path(runs["centralised"][-1]))
            score = run(runs["federated"], Path(runs["federated"][-1]))
            federated.setdefault(alpha, []).append(score)
            line = {"alpha": alpha, "seed": seed, "federated": score, "centralised": central[seed]}
            print(json.dumps(line), flush=True)
    reference = statistics.fmean(central.values())
    print(
        f"\n{args.method}: {args.rounds} rounds x {args.local_steps} local steps, "
        f"{args.clients_per_round} of {args.clients} clients; centralised "
        f"{args.rounds * args.clients_per_round * args.local_steps} steps, mean {reference:.4f}"
    )
    print("| alpha | federated (mean) | centralised (mean) | ratio | worst seed's ratio |")
    print("|---|---|---|---|---|")
    for alpha, scores in federated.items():
        mean = statistics.fmean(scores)
        print(
            f"| {alpha:g} | {mean:.4f} | {reference:.4f} | {mean / reference:.3f}x "
            f"| {min(scores) / reference:.3f}x |"
        )


if __name__ == "__main__":
    sys.exit(main())
