"""Reading a run's JSONL log (`train_log.jsonl`) back: the training curve that
`microtune plot` draws. The trainer writes two kinds of line: `{"step", "loss", "lr", ...}`
every `log_every` steps and `{"step", "eval": {metric: value}}` at each dev evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from microtune.common.files import LOG_FILE
from microtune.errors import MicrotuneError


@dataclass(frozen=True)
class TrainingCurve:
    """The loss lines and the dev evaluations of one run, in step order.

    Attributes:
        steps: the step of each loss line.
        losses: the training loss averaged since the line before.
        eval_steps: the step of each dev evaluation.
        metrics: metric name -> its value at each of `eval_steps` (None where undefined).
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float | None]] = field(default_factory=dict)


def read_train_log(run_dir: str | Path) -> TrainingCurve:
    """The training curve of the run in `run_dir` (the `--output` of `microtune train`)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise MicrotuneError(
            f"{run_dir} has no {LOG_FILE}; give the --output folder of `microtune train`"
        )
    curve = TrainingCurve()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as error:
            raise MicrotuneError(
                f"{path}, line {number}: not a training log line ({error}); "
                "is this the log of `microtune train`?"
            ) from None
        if "loss" in record:
            curve.steps.append(step)
            curve.losses.append(float(record["loss"]))
        if isinstance(record.get("eval"), dict):
            _add_evaluation(curve, step, record["eval"])
    return curve


def _add_evaluation(curve: TrainingCurve, step: int, metrics: dict) -> None:
    """One dev evaluation: a value (or None) for every metric seen so far or now."""
    for name in metrics:
        curve.metrics.setdefault(name, [None] * len(curve.eval_steps))
    curve.eval_steps.append(step)
    for name, values in curve.metrics.items():
        value = metrics.get(name)
        values.append(float(value) if isinstance(value, (int, float)) else None)
