"""`microtune bench report DIR`: the cell records as report.md and PNG plots.

Per task and method: the main dev metric's mean ± std over seeds, trained numbers besides the
head, stored bytes, step time, step ÷ no-grad forward, peak memory, padding, and inference
time ÷ the base model (unmerged and merged). A summary table gives each method's score per
task and, for methods that ran every task of the bench, the mean over tasks. Plots (with
matplotlib, `pip install 'microtune[bench]'`): score against trained numbers (the frontier),
score against stored bytes, step time, and inference time ÷ base.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from microtune.bench.reproduce import TOLERANCE, read_checks
from microtune.bench.runner import FAILED, read_record, read_records
from microtune.common.files import atomic_write
from microtune.errors import MicrotuneError

REPORT_FILE = "report.md"
PLOTS = {
    "frontier": "score_vs_trained.png",
    "stored": "score_vs_stored_bytes.png",
    "step": "step_time.png",
    "inference": "inference_over_base.png",
}
PANEL_COLUMNS = 3


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method label), in the order the records' tasks and labels first
    appear."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["label"])].append(record)
    rows = []
    for (task, label), runs in groups.items():
        scores = [r["score"] for r in runs if r["score"] is not None]
        inference = [r.get("inference") or {} for r in runs]
        rows.append(
            {
                "task": task,
                "label": label,
                "method": runs[0]["method"],
                "metric": runs[0]["metric"],
                "seeds": sorted(r["seed"] for r in runs),
                "scores": scores,
                "mean": statistics.mean(scores) if scores else None,
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "lr": runs[0]["lr"],
                "trained": runs[0]["trained"]["method"],
                "head": runs[0]["trained"]["head"],
                "stored_bytes": statistics.median(r["stored_bytes"] for r in runs),
                "step_ms": statistics.median(r["step_ms"]["median"] for r in runs),
                "step_ms_min": min(r["step_ms"]["min"] for r in runs),
                "step_ms_max": max(r["step_ms"]["max"] for r in runs),
                "step_over_forward": _median(
                    [(r.get("step_vs_forward") or {}).get("ratio") for r in runs]
                ),
                "train_s": statistics.median(r["train_time_s"] for r in runs),
                "peak_mb": max(_peak(r) for r in runs) / 2**20,
                "padded": statistics.mean(r["padding"]["padded_fraction"] for r in runs),
                "unmerged_over_base": _median(
                    [(i.get("unmerged") or {}).get("over_base") for i in inference]
                ),
                "merged_over_base": _median(
                    [(i.get("merged") or {}).get("over_base") for i in inference]
                ),
            }
        )
    return rows


def _position(entries: list[dict[str, Any]], value: str, key: str) -> int:
    """Where `value` comes in the bench file's list (after all of them when absent)."""
    names = [e[key] for e in entries]
    return names.index(value) if value in names else len(names)


def _ordered(preferred: list[str], found: list[str]) -> list[str]:
    """The values found, in the bench file's order first, then as found."""
    return [v for v in preferred if v in found] + [
        v for v in dict.fromkeys(found) if v not in preferred
    ]


def _peak(record: dict[str, Any]) -> int:
    peak = record["peak_memory"]
    return peak["cuda_allocated_bytes"] or peak["rss_bytes"]


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _score(row: dict[str, Any]) -> str:
    if row["mean"] is None:
        return "n/a"
    return f"{row['mean']:.4f} ± {row['std']:.4f} ({len(row['scores'])})"


def task_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | score, mean ± std (seeds) | trained (+ head) | stored bytes | lr "
        "| step ms (min–max) | step ÷ fwd | train s | peak MB | padded | unmerged ÷ base "
        "| merged ÷ base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_score(r)} | {r['trained']:,} (+ {r['head']:,}) "
            f"| {r['stored_bytes']:,.0f} | {r['lr']:g} "
            f"| {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) "
            f"| {_number(r['step_over_forward'], '.2f')} | {r['train_s']:.1f} "
            f"| {r['peak_mb']:.0f} | {r['padded']:.1%} "
            f"| {_number(r['unmerged_over_base'], '.3f')} "
            f"| {_number(r['merged_over_base'], '.3f')} |"
        )
    return lines


def seed_means(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[int, float]]:
    """label -> seed -> the mean main metric over the tasks, for the seeds where the method
    ran every task with a score."""
    scores: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in records:
        if r["score"] is not None:
            scores[(r["label"], r["seed"])][r["task"]] = r["score"]
    means: dict[str, dict[int, float]] = defaultdict(dict)
    for (label, seed), by_task in scores.items():
        if set(tasks) <= set(by_task):
            means[label][seed] = statistics.mean(by_task[t] for t in tasks)
    return means


def _spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({len(values)})"


def summary_table(
    rows: list[dict[str, Any]], tasks: list[str], means: dict[str, dict[int, float]]
) -> list[str]:
    """Methods × tasks of mean scores over seeds, and the mean over tasks ± its std over the
    seeds that ran every task; trained numbers (besides the head) and stored bytes."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["task"]): r for r in rows}
    mean_name = f"{len(tasks)}-task mean ± std (seeds)" if len(tasks) > 1 else "mean"
    lines = [
        "| method | trained | stored bytes | " + " | ".join(tasks) + f" | {mean_name} |",
        "|---|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for label in labels:
        cells = [by.get((label, t)) for t in tasks]
        scores = [c["mean"] if c else None for c in cells]
        seeds = list(means.get(label, {}).values())
        first = next(c for c in cells if c)
        lines.append(
            f"| {label} | {first['trained']:,} | {first['stored_bytes']:,.0f} | "
            + " | ".join(_number(s, ".4f") for s in scores)
            + f" | {_spread(seeds) if seeds else '–'} |"
        )
    return lines


def claim_table(claims: list[dict], means: dict[str, dict[int, float]], rows: list) -> list[str]:
    """Each claim of the bench file, seed by seed on the mean over tasks: the value's mean and
    range over the seeds both methods completed, its goal, and stored bytes where bounded."""
    lines = [
        "| claim | value, mean (min–max) over seeds | seeds | goal | met |",
        "|---|---|---|---|---|",
    ]
    for claim in claims:
        a, b = means.get(claim["a"], {}), means.get(claim["b"], {})
        seeds = sorted(set(a) & set(b))
        goal = f"≥ {claim['goal']:g}"
        if not seeds:
            lines.append(f"| {claim['name']} | not run yet | – | {goal} | – |")
            continue
        ratio = claim["kind"] == "ratio"
        values = [a[s] / b[s] if ratio else a[s] - b[s] for s in seeds]
        met = statistics.mean(values) >= claim["goal"]
        if claim.get("max_bytes_ratio"):
            size = _median_bytes(rows, claim["a"]) / _median_bytes(rows, claim["b"])
            met = met and size <= claim["max_bytes_ratio"]
            goal += (
                f"; stored bytes {size:.3f} × {claim['b']}'s (goal ≤ {claim['max_bytes_ratio']:g})"
            )
        value = f"{statistics.mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"
        seen = ", ".join(map(str, seeds))
        lines.append(f"| {claim['name']} | {value} | {seen} | {goal} | {'yes' if met else 'no'} |")
    return lines


def _median_bytes(rows: list[dict[str, Any]], label: str) -> float:
    return statistics.median(r["stored_bytes"] for r in rows if r["label"] == label)


def cost_table(records: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """What a cell cost on this machine (process wall time: training, the dev evaluation and
    any timing), in minutes: each method's median over seeds per task and one seed of all the
    tasks, each task's median over every cell, and the CPU hours of all (wall × threads)."""
    timed = [r for r in records if "cell_time_s" in r]
    minutes = defaultdict(list)
    for r in timed:
        minutes[r["label"], r["task"]].append(r["cell_time_s"] / 60)
    lines = [f"| minutes per cell | {' | '.join(tasks)} | one seed of every task |"]
    lines.append("|---" * (len(tasks) + 2) + "|")
    for label in dict.fromkeys(r["label"] for r in timed):
        medians = [
            statistics.median(minutes[label, t]) if minutes[label, t] else None for t in tasks
        ]
        whole = f"{sum(medians):.0f}" if None not in medians else "–"
        shown = [f"{m:.1f}" if m is not None else "–" for m in medians]
        lines.append(f"| {label} | {' | '.join(shown)} | {whole} |")
    spreads = []
    for task in tasks:
        all_cells = [m for (_, t), times in minutes.items() if t == task for m in times]
        spreads.append(
            f"{statistics.median(all_cells):.1f} ({min(all_cells):.1f}–{max(all_cells):.1f})"
            if all_cells
            else "–"
        )
    lines.append(f"| every cell: median (min–max) | {' | '.join(spreads)} | |")
    return [*lines, "", f"CPU hours over {len(records)} cells: {cpu_hours(records):.1f}"]


def cpu_hours(records: list[dict[str, Any]]) -> float:
    """What the cells cost in all: each one's process wall time × its threads."""
    return sum(r.get("cell_time_s", 0) * (r.get("threads") or 1) for r in records) / 3600


def check_table(checks: list[dict[str, Any]]) -> list[str]:
    """Cells trained again from their records' commands (`microtune bench reproduce`)."""
    lines = [
        f"Each cell below was trained again with `microtune bench reproduce`, from the "
        f"`microtune train` command its record names; goal: within {TOLERANCE} of the record.",
        "",
        "| cell | recorded | re-run | difference | kernels | CPU of the re-run | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c['cell']} | {c['recorded']:.4f} | {c['rerun']:.4f} | {c['difference']:+.4f} "
            f"| {c['kernels']} | {c['cpu']} | {'yes' if c['within'] else 'no'} |"
        )
    return lines


def failures(folder: Path) -> list[dict[str, Any]]:
    """The failure records of cells that have no record."""
    found = [read_record(p) for p in sorted((folder / FAILED).glob("*.json"))]
    return [f for f in found if f and not (folder / "cells" / f"{f['cell']}.json").is_file()]


def shared_cores_warning(records: list[dict[str, Any]]) -> list[str]:
    """A header line when any cell was timed while others ran (`bench run --jobs` > 1)."""
    jobs = max(r.get("jobs") or 1 for r in records)  # records before `jobs` existed: unknown
    if jobs == 1:
        return []
    return [
        f"- **warning**: timings taken with {jobs} cells at once on shared cores: compare "
        "ratios within a cell (÷ base, ÷ forward), not absolute times across cells"
    ]


def tally(values: list[str]) -> str:
    """Each distinct value once, in order of first appearance; with how many records hold it
    when they differ (a grid can span a package upgrade or two machines)."""
    counts = {value: values.count(value) for value in values}
    if len(counts) == 1:
        return values[0]
    return " / ".join(f"{value} ({count} cells)" for value, count in counts.items())


def machine(record: dict[str, Any]) -> str:
    """Where a cell ran: CPU, cores, threads, kernels, GPU and device."""
    hardware = record["hardware"]
    text = f"{hardware['cpu']} ({hardware['usable_cores']} usable cores"
    text += f", {hardware['torch_threads']} threads per cell"
    text += f", {hardware['kernels']} kernels)" if hardware.get("kernels") else ")"
    if hardware.get("gpu"):
        text = f"{hardware['gpu']}; {text}"
    return f"{text}, device {record['device']}"


def versions(records: list[dict[str, Any]]) -> str:
    """Each package's version over the records, every version named where they differ."""
    names = dict.fromkeys(name for r in records for name, v in r["versions"].items() if v)
    return ", ".join(
        f"{name} {tally([r['versions'].get(name) or '?' for r in records])}" for name in names
    )


def header(records: list[dict[str, Any]], folder: Path) -> list[str]:
    first = records[0]
    protocol = first["protocol"]
    length = (
        f"{protocol['max_steps']} steps"
        if protocol["max_steps"] is not None
        else f"{protocol['epochs']} epochs"
    )
    hashes = sorted({r["config_hash"] for r in records})
    return [
        f"# Bench: {first['bench']}",
        "",
        f"Written by `microtune bench report {folder}` from {len(records)} cell records.",
        "",
        f"- model: `{first['model']}`",
        f"- protocol: {length} of batch {protocol['batch_size']} × {protocol['grad_accum']}, "
        f"max length {protocol['max_length']}, warmup {protocol['warmup_ratio']}, weight decay "
        f"{protocol['weight_decay']}, length-grouped batches: {protocol['group_by_length']}"
        + (
            f", first {protocol['max_train_examples']} training examples"
            if protocol["max_train_examples"]
            else ""
        ),
        f"- machine: {tally([machine(r) for r in records])}",
        f"- versions: {versions(records)}",
        f"- config hash: {', '.join(hashes)}",
        *shared_cores_warning(records),
        "",
        "Score: the task's main dev metric. Trained: numbers trained besides the head. Step ms: "
        "median training step (min–max over steps). Step ÷ fwd: one training step ÷ one no-grad "
        "forward of the same batch (medians of interleaved rounds). Inference ÷ base: dev-set "
        "inference of the trained model, unmerged and merged, ÷ the base model, timed "
        "interleaved in the same process (medians). Padded: share of token positions in the "
        "training batches that are padding.",
        "",
    ]


def report(folder: str | os.PathLike) -> dict[str, Any]:
    """Write report.md (and the plots, with matplotlib) into the bench folder."""
    folder = Path(folder)
    records = read_records(folder)
    if not records:
        raise MicrotuneError(f"{folder} holds no cell records; run `microtune bench run` first")
    planned = read_record(folder / "bench.json") or {}
    order = planned.get("config", {})
    records = sorted(
        records, key=lambda r: _position(order.get("methods", []), r["label"], "label")
    )
    rows = summarise(records)
    tasks = _ordered(order.get("tasks", []), [r["task"] for r in records])
    # A bench still running: task means and claims wait for every task the bench file names.
    planned = list(dict.fromkeys([*order.get("tasks", []), *tasks]))
    means = seed_means(records, planned)
    lines = header(records, folder)
    lines += ["## Summary", "", *summary_table(rows, planned, means), ""]
    if order.get("claims"):
        lines += ["## Claims", "", *claim_table(order["claims"], means, rows), ""]
    lines += ["## Cost", "", *cost_table(records, tasks), ""]
    checks = read_checks(folder, records)
    if checks:
        lines += ["## Reproduction checks", "", *check_table(checks), ""]
    for task in tasks:
        metric = next(r["metric"] for r in rows if r["task"] == task)
        lines += [f"## {task} ({metric})", "", *task_table([r for r in rows if r["task"] == task])]
        lines.append("")
    failed = failures(folder)
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {f['cell']}: {f['error']} (log: {f['log']})" for f in failed] + [""]
    written = plot(rows, tasks, folder, planned)
    if written:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in written] + [""]
    else:
        lines += ["(no plots: matplotlib is not installed; pip install 'microtune[bench]')", ""]

    def write(tmp: str) -> None:
        Path(tmp).write_text("\n".join(lines), encoding="utf-8")

    atomic_write(folder / REPORT_FILE, write)
    return {
        "report": str(folder / REPORT_FILE),
        "plots": [str(folder / name) for name in written],
        "cells": len(records),
        "failed": len(failed),
    }


def plot(
    rows: list[dict[str, Any]], tasks: list[str], folder: Path, planned: list[str] | None = None
) -> list[str]:
    """The four PNGs, a panel per task of `tasks` and one of the mean over `planned` (default:
    `tasks`) for the methods that ran them all; returns their file names (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colours = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    planned = planned or tasks
    means = task_means(rows, planned) if len(planned) > 1 else []
    panels = [*tasks, "mean"] if means else tasks
    points = [*rows, *means]
    written = []
    for name, x_key, x_label in (
        ("frontier", "trained", "numbers trained besides the head (symlog)"),
        ("stored", "stored_bytes", "stored bytes (log)"),
    ):
        figure, axes = _panels(plt, len(panels))
        for axis, task in zip(axes.flat, panels, strict=False):
            for r in (r for r in points if r["task"] == task and r["mean"] is not None):
                axis.errorbar(
                    r[x_key], r["mean"], yerr=r["std"], fmt="o", capsize=3,
                    color=colours[r["label"]], label=r["label"],
                )  # fmt: skip
                if task == "mean":  # the panel people read first: each point named
                    axis.annotate(
                        r["label"], (r[x_key], r["mean"]), xytext=(4, 3),
                        textcoords="offset points", fontsize=7,
                    )  # fmt: skip
            if x_key == "trained":
                axis.set_xscale("symlog", linthresh=100)
            else:
                axis.set_xscale("log")
            axis.set_xlabel(x_label)
            axis.set_ylabel(next((r["metric"] for r in points if r["task"] == task), ""))
            axis.set_title(task)
            axis.grid(alpha=0.3)
        _legend(figure, axes)
        written.append(_save(figure, folder / PLOTS[name]))

    written.append(_plot_steps(plt, rows, tasks, labels, colours, folder))
    inference = _plot_inference(plt, rows, folder)
    return written + ([inference] if inference else [])


def _panels(plt, count: int) -> tuple[Any, Any]:
    """A figure of `count` panels, PANEL_COLUMNS to a row (five tasks and the mean read as two
    rows rather than one strip too wide for a page); the unused places are hidden."""
    columns = min(PANEL_COLUMNS, count)
    lines = math.ceil(count / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.5 * columns, 4 * lines), squeeze=False)
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    return figure, axes


def _plot_steps(plt, rows, tasks, labels, colours, folder: Path) -> str:
    """Median step time per method and task, as horizontal bars."""
    figure, axes = plt.subplots(
        1, len(tasks), figsize=(4.5 * len(tasks), 0.35 * len(labels) + 1.5), squeeze=False
    )
    for axis, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        axis.barh(
            [r["label"] for r in task_rows],
            [r["step_ms"] for r in task_rows],
            color=[colours[r["label"]] for r in task_rows],
        )
        axis.set_xscale("log")
        axis.set_xlabel("median step ms (log)")
        axis.set_title(task)
        axis.invert_yaxis()
    return _save(figure, folder / PLOTS["step"])


def _plot_inference(plt, rows, folder: Path) -> str | None:
    """Unmerged and merged inference time over the base's, per method (None: none timed)."""
    timed = [r for r in rows if r["unmerged_over_base"] is not None]
    if not timed:
        return None
    methods = list(dict.fromkeys(r["label"] for r in timed))
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(methods) + 2), 4))
    for offset, key in ((-0.2, "unmerged_over_base"), (0.2, "merged_over_base")):
        values = [_median([r[key] for r in timed if r["label"] == m]) for m in methods]
        axis.bar(
            [i + offset for i in range(len(methods))],
            [v if v is not None else 0 for v in values],
            width=0.4,
            label=key.split("_")[0],
        )
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    axis.set_ylabel("inference time ÷ base (median over tasks)")
    axis.legend()
    return _save(figure, folder / PLOTS["inference"])


def task_means(rows: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """Rows of task "mean": each method's mean score over the tasks, where it ran them all
    (std: the mean of the tasks' stds)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        if {r["task"] for r in mine} != set(tasks) or any(r["mean"] is None for r in mine):
            continue
        out.append(
            {
                **mine[0],
                "task": "mean",
                "metric": "mean main metric",
                "mean": statistics.mean(r["mean"] for r in mine),
                "std": statistics.mean(r["std"] for r in mine),
            }
        )
    return out


def _legend(figure, axes) -> None:
    found: dict[str, Any] = {}
    for axis in axes.flat:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            found.setdefault(name, handle)
    handles, names = list(found.values()), list(found)
    if handles:
        figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _save(figure, path: Path) -> str:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path.name
