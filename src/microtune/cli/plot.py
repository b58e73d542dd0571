"""`microtune plot`: a run's training curve as a PNG: the training loss, and below it the dev
metric where the log has one (matplotlib: `pip install 'microtune[bench]'`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from microtune.common.files import LOG_FILE
from microtune.errors import MicrotuneError
from microtune.training.log import TrainingCurve, read_train_log

DEFAULT_NAME = "training_curve.png"


def add(commands) -> None:
    plot = commands.add_parser(
        "plot", help="draw a run's training curve (loss, dev metric) as a PNG; prints its path"
    )
    plot.add_argument(
        "--run", required=True, help=f"a `microtune train` --output folder (with its {LOG_FILE})"
    )
    plot.add_argument("--output", help=f"the PNG to write (default: RUN/{DEFAULT_NAME})")
    plot.add_argument(
        "--metric", help="the dev metric to draw (default: the first the log records)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    curve = read_train_log(args.run)
    if not curve.steps and not curve.eval_steps:
        raise MicrotuneError(f"{args.run}/{LOG_FILE} holds no step yet; plot when training has run")
    metric = args.metric or next(iter(curve.metrics), None)
    if metric is not None and metric not in curve.metrics:
        known = ", ".join(curve.metrics) or "none"
        raise MicrotuneError(f"the log records no dev metric '{metric}'; it has: {known}")
    output = Path(args.output) if args.output else Path(args.run) / DEFAULT_NAME
    panels = draw(curve, metric, output, title=Path(args.run).resolve().name)
    last = max(curve.steps + curve.eval_steps)
    return {"plot": str(output), "panels": panels, "metric": metric, "last_step": last}


def draw(curve: TrainingCurve, metric: str | None, output: Path, title: str) -> int:
    """Write the PNG: loss against step, and `metric` against step below it when given;
    returns the number of panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MicrotuneError("plot needs matplotlib: pip install 'microtune[bench]'") from None
    panels = 2 if metric else 1
    figure, axes = plt.subplots(panels, 1, figsize=(7, 2.8 * panels), sharex=True, squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot(curve.steps, curve.losses, color="tab:blue", linewidth=1.2)
    loss_axis.set_ylabel("training loss")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    if metric:
        values = zip(curve.eval_steps, curve.metrics[metric], strict=True)
        pairs = [(step, value) for step, value in values if value is not None]
        metric_axis = axes[1][0]
        if pairs:
            metric_axis.plot(*zip(*pairs, strict=True), marker="o", color="tab:orange")
        metric_axis.set_ylabel(f"dev {metric}")
        metric_axis.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return panels
