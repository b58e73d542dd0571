"""`microtune bench`: methods x tasks x seeds from a bench file: run, tune, report, reproduce."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.errors import MicrotuneError

TEXT = "methods x tasks x seeds from a bench file (bench/configs/*.toml): run, tune, report"
ACTIONS = (
    ("run", "run every unfinished cell; one JSON record per cell in --output/cells"),
    ("tune", "choose each method's learning rate on a slice of the training set"),
)


def add(commands) -> None:
    bench = commands.add_parser("bench", help=TEXT, description=TEXT)
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    for name, help_text in ACTIONS:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", nargs="?", help="bench file (TOML)")
        sub.add_argument(
            "--output", help=f"bench folder (default: runs/{name.replace('run', 'bench')}-<name>)"
        )
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
        sub.add_argument("--jobs", type=int, default=1, help="cells at once")
        sub.add_argument("--model", help="base model instead of the bench file's")
        sub.add_argument("--data-dir", help="data folder instead of the bench file's")
        if name == "run":
            sub.add_argument(
                "--quick", action="store_true", help="the quick preset (bench/configs/quick.toml)"
            )
    report = actions.add_parser("report", help="write report.md and PNG plots of a bench folder")
    report.add_argument("folder", help="bench folder (a `bench run` --output)")
    again = actions.add_parser(
        "reproduce",
        help="train finished cells again from their records' commands and compare dev scores",
    )
    again.add_argument("folder", help="bench folder (a `bench run` --output)")
    again.add_argument("cells", nargs="+", metavar="CELL", help="cell names, e.g. lora-cola-s0")
    again.add_argument("--data-dir", help="data folder instead of the one the record names")
    again.add_argument(
        "--cpu-capability",
        choices=["avx2"],
        help="run the AVX2 kernels, as a CPU without AVX-512 would (default: this CPU's best)",
    )


def _config_path(args: argparse.Namespace) -> str:
    from microtune.bench.config import quick_config_path

    config_path = args.config
    if getattr(args, "quick", False):
        if config_path:
            raise MicrotuneError("give a bench file or --quick, not both")
        config_path = quick_config_path()
    if not config_path:
        raise MicrotuneError("name a bench file, e.g. bench/configs/full.toml (or --quick)")
    return config_path


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.bench.config import load_config

    if args.bench_command == "report":
        from microtune.bench.report import report

        return report(args.folder)
    if args.bench_command == "reproduce":
        from microtune.bench.reproduce import reproduce

        return reproduce(args.folder, args.cells, args.data_dir, args.cpu_capability)
    config_path = _config_path(args)
    overrides = {
        k: v for k, v in (("model", args.model), ("data_dir", args.data_dir)) if v is not None
    }
    if args.bench_command == "tune":
        from microtune.bench.tune import tune

        name = load_config(config_path, overrides, tuned=False).name
        output = args.output or f"runs/tune-{name}"
        return tune(config_path, output, device=args.device, jobs=args.jobs, overrides=overrides)
    from microtune.bench.runner import run_bench

    config = load_config(config_path, overrides)
    output = args.output or f"runs/bench-{config.name}"
    return run_bench(config, output, device=args.device, jobs=args.jobs)
