"""A grid from the command line, without a bench file: `microtune bench` underneath.

Builds a bench config from flags, runs it with `microtune.bench.runner.run_bench` (one worker
process per cell, resumable, one JSON record per cell) and writes the report
(`microtune.bench.report`: report.md and plots) into --output. For anything kept, write a
bench file under bench/configs/ and use `microtune bench run` instead.

    python bench/matrix.py --methods slash,jrwarp,warp --tasks sst2,rte --seeds 0,1,2 \\
        --max-steps 1000 --output runs/bench-prompts

A method entry may carry options after a colon, as `name:key=value+key=value` (`lr` sets the
learning rate), so one grid can hold variants:

    python bench/matrix.py --methods lora pafi:k=73728 pafi:k=73728+mask=largest --tasks sst2
"""

from __future__ import annotations

import argparse
import json
import os

from microtune.bench.config import BenchConfig, MethodEntry, Protocol, Timing
from microtune.bench.report import report
from microtune.bench.runner import run_bench


def parse_value(text: str):
    """A TOML-like scalar: true/false, a number, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method(entry: str) -> MethodEntry:
    """`pafi:k=73728+mask=largest` -> pafi with options {"k": 73728, "mask": "largest"}."""
    name, _, text = entry.partition(":")
    options = {}
    for option in filter(None, text.split("+")):
        key, _, value = option.partition("=")
        options[key.replace("-", "_")] = parse_value(value)
    lr = options.pop("lr", None)
    return MethodEntry(label=entry, method=name, lr=lr, options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["slash,jrwarp,warp"],
        help="method entries, space-separated: name or name:key=value+key=value",
    )
    parser.add_argument("--tasks", default="sst2,rte")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    parser.add_argument("--rounds", type=int, default=3, help="inference timing rounds (0: off)")
    parser.add_argument("--output", default="runs/bench-matrix")
    args = parser.parse_args()

    entries = [
        parse_method(m)
        for entry in args.methods
        for m in (entry.split(",") if ":" not in entry else [entry])
    ]
    config = BenchConfig(
        name=os.path.basename(os.path.normpath(args.output)),
        model=os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
        data_dir=os.path.abspath(args.data_dir),
        tasks=tuple(args.tasks.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        methods=tuple(entries),
        protocol=Protocol(
            max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length
        ),
        timing=Timing(inference_examples=256, rounds=args.rounds, step_rounds=args.rounds),
    )
    summary = run_bench(
        config, args.output, device=args.device, jobs=args.jobs, threads=args.threads
    )
    print(json.dumps(summary))
    print(json.dumps(report(args.output)))


if __name__ == "__main__":
    main()
