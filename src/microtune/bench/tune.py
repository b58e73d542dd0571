"""Fair tuning: each method's learning rate chosen on a slice of the training set, never dev.

`microtune bench tune CONFIG` carves a seeded slice out of the training split of each task it
tunes on (`tune.tasks`, else all; the rest trains), writes both as a data folder (the slice in
the dev split's place), runs every method at every learning rate of its grid on it through the
ordinary runner (so tuning is as resumable as a bench), grows a grid whose best rate is at its
edge by a rate past it (up to `tune.extend` times), and writes the rate with the best mean main
metric over tasks and seeds into the `lrs` file a bench file names.
Nothing of the dev split is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microtune.bench.config import (
    BenchConfig,
    MethodEntry,
    Protocol,
    Timing,
    load_config,
    read_lrs,
)
from microtune.bench.runner import CARVED, read_records, refuse_foreign_folder, run_bench
from microtune.common.files import atomic_write, write_json
from microtune.errors import MicrotuneError
from microtune.methods import method_class
from microtune.tasks.spec import get_task, load_rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    atomic_write(path, write)


def tuning_tasks(config: BenchConfig) -> tuple[str, ...]:
    """The tasks rates are tuned on: `tune.tasks`, else all of the bench's."""
    return config.tune.tasks or config.tasks


def held_out(config: BenchConfig) -> dict[str, Any]:
    """What decides each tuning task's slice (not where the data is)."""
    tune = config.tune
    return {
        "slice_fraction": tune.slice_fraction,
        "slice_max": tune.slice_max,
        "slice_seed": tune.slice_seed,
    }


def carve(config: BenchConfig, folder: str | os.PathLike) -> str:
    """A data folder per tuning task: train = the training split less a seeded slice, the dev
    split = that slice. Kept when an earlier call made it with the same settings."""
    folder = Path(folder)
    tune = config.tune
    settings = {"source": config.data_dir, "tasks": list(tuning_tasks(config))}
    settings |= held_out(config)
    marker = folder / Path(CARVED).name
    if marker.is_file() and json.loads(marker.read_text())["settings"] == settings:
        return str(folder)
    counts = {}
    for name in tuning_tasks(config):
        task = get_task(name)
        rows, _ = load_rows(task, "train", config.data_dir or None)
        size = min(tune.slice_max, max(1, round(tune.slice_fraction * len(rows))))
        if size >= len(rows):
            raise MicrotuneError(f"{name}: a slice of {size} leaves no training examples")
        held = set(random.Random(tune.slice_seed).sample(range(len(rows)), size))
        where = folder / task.folder / task.name
        _write_jsonl(where / "train.jsonl", [r for i, r in enumerate(rows) if i not in held])
        _write_jsonl(where / f"{task.dev_split}.jsonl", [rows[i] for i in sorted(held)])
        counts[name] = {"train": len(rows) - size, "slice": size}
    write_json(marker, {"settings": settings, "counts": counts})
    return str(folder)


def lr_grid(entry: MethodEntry, factors: tuple[float, ...]) -> list[float]:
    """The rates to try: the method's `lr_grid`, else `factors` × its lr (3 significant
    digits)."""

    if entry.lr_grid:
        return sorted(entry.lr_grid)
    base = entry.lr if entry.lr is not None else method_class(entry.method).default_learning_rate
    return sorted({float(f"{f * base:.3g}") for f in factors})


def tuned_methods(config: BenchConfig) -> list[MethodEntry]:
    """The methods that get a rate of their own (not those taking another's by `lr_from`)."""
    return [entry for entry in config.methods if not entry.lr_from]


def grid_label(label: str, lr: float) -> str:
    return f"{label}@lr={lr:g}"


def tried_rates(entry: MethodEntry, factors: tuple[float, ...], records: list[dict]) -> list[float]:
    """The method's grid and every rate beyond it that `extend` added (found in the records)."""
    extra = {r["lr"] for r in records if r["label"].startswith(f"{entry.label}@lr=")}
    return sorted(set(lr_grid(entry, factors)) | extra)


def step_beyond(rates: list[float], best: float) -> float | None:
    """The next rate past the grid's edge the best rate sits on (at the ratio of the two rates
    at that edge), or None when the best is inside the grid."""
    if len(rates) < 2 or rates[0] < best < rates[-1]:
        return None
    if best == rates[-1]:
        return float(f"{best * rates[-1] / rates[-2]:.3g}")
    return float(f"{best * rates[0] / rates[1]:.3g}")


def widen(
    config: BenchConfig, records: list[dict[str, Any]], attempted: set[tuple[str, float]]
) -> dict[str, float]:
    """Per method whose best rate is its grid's edge, while it has grown by fewer than
    `tune.extend` rates: the next rate to try (never one in `attempted`)."""
    wider = {}
    for entry in tuned_methods(config):
        means = rate_means(config, entry, records, echo=lambda _: None)
        # An added rate counts once all its cells are in: a tuning cut off part-way through
        # one proposes it again, and the runner runs only its missing cells.
        grid = lr_grid(entry, config.tune.factors)
        rates = sorted(set(grid) | set(means))
        grown = len(rates) - len(grid)
        if not means or grown >= config.tune.extend:
            continue
        best = max(sorted(means), key=lambda lr: means[lr])
        rate = step_beyond(rates, best)
        if rate is not None and (entry.label, rate) not in attempted:
            wider[entry.label] = rate
    return wider


def tuning_config(config: BenchConfig, data_dir: str) -> BenchConfig:
    """The grid as a bench: one method entry per (method, rate), on the carved data of the
    tuning tasks, with the tuning protocol and no timing."""
    entries = [
        dataclasses.replace(entry, label=grid_label(entry.label, lr), lr=lr, seeds=())
        for entry in tuned_methods(config)
        for lr in lr_grid(entry, config.tune.factors)
    ]
    protocol = dataclasses.asdict(config.protocol)
    unknown = sorted(set(config.tune.protocol) - set(protocol))
    if unknown:
        raise MicrotuneError(f"tune.protocol: unknown key(s) {unknown}; known: {sorted(protocol)}")
    return dataclasses.replace(
        config,
        name=f"{config.name}-tune",
        data_dir=data_dir,
        tasks=tuning_tasks(config),
        seeds=config.tune.seeds,
        methods=tuple(entries),
        protocol=Protocol(**{**protocol, **config.tune.protocol}),
        timing=Timing(inference_examples=0, rounds=0, step_rounds=0),
        lrs="",
        held_out=held_out(config),
    )


def rate_means(
    config: BenchConfig, entry: MethodEntry, records: list[dict[str, Any]], echo=print
) -> dict[float, float]:
    """The method's mean main metric on the slices at each rate of its grid whose cells all
    finished with a score; a rate with an unscored cell is skipped, with a note through `echo`."""
    cells_needed = len(tuning_tasks(config)) * len(config.tune.seeds)
    means = {}
    for lr in tried_rates(entry, config.tune.factors, records):
        label = grid_label(entry.label, lr)
        mine = [r for r in records if r["label"] == label]
        unscored = [r["cell"] for r in mine if r["score"] is None]
        if unscored:
            echo(f"{label}: skipped, no score (undefined metric) in {', '.join(unscored)}")
            continue
        if len(mine) == cells_needed:
            means[lr] = statistics.mean(r["score"] for r in mine)
    return means


def choose(
    config: BenchConfig, records: list[dict[str, Any]], echo=print
) -> dict[str, dict[str, Any]]:
    """Per method: the mean main metric on the slice of every rate whose cells all finished
    with a score, and the best rate (the lower one on a tie). A rate with a cell whose metric
    is undefined (e.g. constant predictions) is skipped, with a note through `echo`."""
    chosen = {}
    for entry in tuned_methods(config):
        means = rate_means(config, entry, records, echo)
        if not means:
            raise MicrotuneError(
                f"no learning rate of {entry.label} finished every cell with a score; see "
                "the failed or unscored cells above"
            )
        best = max(sorted(means), key=lambda lr: means[lr])
        chosen[entry.label] = {"lr": best, "mean": means[best], "grid": means}
    return chosen


def write_lrs(path: str | os.PathLike, chosen: dict[str, dict[str, Any]], how: str) -> None:
    """Write the chosen rates, keeping the lines of labels tuned earlier and not now (a bench
    tuned a few methods at a time, with `only`, collects all of them in one file)."""
    lines = [f"# Written by `{how}`: each method's learning rate with the best mean main", ""]
    lines[0] += " metric on slices of the training sets (never dev). Grid: rate = mean score."
    lines += ["[lrs]"]
    for label, choice in chosen.items():
        grid = ", ".join(f"{lr:g} = {mean:.4f}" for lr, mean in choice["grid"].items())
        lines.append(f"{json.dumps(label)} = {choice['lr']!r}  # {grid}")
    earlier = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).is_file() else []
    kept = read_lrs(str(path)) if earlier else {}
    lines += [
        line
        for line in earlier
        if any(line.startswith(json.dumps(label) + " =") for label in kept.keys() - chosen.keys())
    ]

    def write(tmp: str) -> None:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")

    atomic_write(path, write)


def extend_edges(
    config: BenchConfig, data_dir: str, output: Path, run: Callable, echo=print
) -> list[dict[str, Any]]:
    """Grow each grid whose best rate sits on its edge by one rate at a time (`tune.extend`
    at most), running each new rate's cells with `run`; returns their summaries."""
    summaries, attempted = [], set()
    while wider := widen(config, read_records(output), attempted):
        shown = ", ".join(f"{label} {lr:g}" for label, lr in wider.items())
        echo(f"best rate at its grid's edge; trying one beyond: {shown}")
        attempted |= set(wider.items())
        beyond = tuple(
            dataclasses.replace(entry, lr_grid=(wider[entry.label],))
            for entry in tuned_methods(config)
            if entry.label in wider
        )
        summaries.append(run(tuning_config(dataclasses.replace(config, methods=beyond), data_dir)))
    return summaries


def tune(
    config_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    device: str = "auto",
    jobs: int = 1,
    overrides: dict[str, Any] | None = None,
    echo=print,
    on_result=None,
) -> dict[str, Any]:
    """Carve, run the grid into `output`, write the chosen rates to the config's `tune.write`;
    `on_result` sees each cell's record as it lands (`run_bench`)."""
    config = load_config(config_path, overrides, tuned=False)
    output = Path(output)
    refuse_foreign_folder(output)
    data_dir = carve(config, (output / CARVED).parent)

    def run(bench: BenchConfig) -> dict[str, Any]:
        return run_bench(bench, output, device=device, jobs=jobs, echo=echo, on_result=on_result)

    summary = run(tuning_config(config, data_dir))
    for extension in extend_edges(config, data_dir, output, run, echo):
        summary["ran"] += extension["ran"]
        summary["failed"] += extension["failed"]
    chosen = choose(config, read_records(output), echo)
    write_lrs(config.tune.write, chosen, f"microtune bench tune {config_path}")
    echo(f"wrote {config.tune.write}")
    return {**summary, "lrs": config.tune.write, "chosen": {k: v["lr"] for k, v in chosen.items()}}
