"""Running a bench: every cell not yet finished, as worker subprocesses, `jobs` at once.

The output folder holds

    bench.json          the resolved config and its hash
    cells/<cell>.json   one record per finished cell (written atomically by the worker)
    failed/<cell>.json  the last error of a cell that failed (rerun next time)
    specs/<cell>.json   what the worker was given
    logs/<cell>.log     the worker's output
    runs/<cell>/        the cell's artifact, metrics.json and train_log.jsonl

A cell whose record exists with the same cell hash is finished and never rerun; a record
with another hash (the cell's method, options, learning rate or protocol changed) is stale,
and the cell runs again. Each cell is its own process, so no state leaks between cells.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import microtune
from microtune.bench.config import BenchConfig, Cell, cells, check_config
from microtune.common.files import write_json
from microtune.errors import MicrotuneError

CELLS, FAILED, SPECS, LOGS, RUNS = "cells", "failed", "specs", "logs", "runs"
CARVED = "data/carved.json"  # `bench tune`'s data, carved before its first cell runs


def read_record(path: Path) -> dict[str, Any] | None:
    """A cell record, or None when it is missing or unreadable (a torn file is rerun)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_records(output: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished cell's record in a bench folder, by cell name."""
    folder = Path(output) / CELLS
    records = [read_record(p) for p in sorted(folder.glob("*.json"))]
    return [r for r in records if r is not None]


def worker_environment(threads: int) -> dict[str, str]:
    """The worker's environment: this process's, the same microtune code first on the path,
    `threads` CPU threads, and the hub offline unless the caller said otherwise."""
    source = str(Path(microtune.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    env = {
        **os.environ,
        "PYTHONPATH": source + (os.pathsep + path if path else ""),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_cell(cell: Cell, output: Path, device: str, threads: int, jobs: int = 1) -> dict[str, Any]:
    """Run one cell in a worker subprocess (one of `jobs` at once, `threads` CPU threads);
    returns its record, or a failure record."""
    key = cell.key
    spec_path = output / SPECS / f"{key}.json"
    command = [sys.executable, "-m", "microtune.bench.worker", str(spec_path)]
    spec = {
        **cell.spec(),
        "cell_hash": cell.cell_hash(),
        "output": str(output / RUNS / key),
        "record": str(output / CELLS / f"{key}.json"),
        "device": device,
        "threads": threads,
        "jobs": jobs,
        "command": command,
    }
    write_json(spec_path, spec)
    (output / LOGS).mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(output / LOGS / f"{key}.log", "w", encoding="utf-8") as log:
        done = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=worker_environment(threads)
        )
    seconds = time.time() - started
    record = read_record(Path(spec["record"]))
    failed = output / FAILED / f"{key}.json"
    if done.returncode == 0 and record is not None:
        failed.unlink(missing_ok=True)
        return {**record, "_seconds": seconds}
    lines = (output / LOGS / f"{key}.log").read_text(encoding="utf-8", errors="replace")
    last = [line for line in lines.splitlines() if line.strip()][-1:] or ["no output"]
    failure = {
        "cell": key,
        "label": cell.entry.label,
        "task": cell.task,
        "seed": cell.seed,
        "returncode": done.returncode,
        "error": last[0].strip(),
        "log": str(output / LOGS / f"{key}.log"),
    }
    write_json(failed, failure)
    return {**failure, "failed": True, "_seconds": seconds}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(index: int, total: int, result: dict[str, Any], eta: float) -> str:
    """One line per finished cell: what it scored, its step time, and the time left."""
    head = f"[{index}/{total}] {result['cell']}"
    tail = f"({result['_seconds']:.0f} s; ETA {_duration(eta)})"
    if result.get("failed"):
        return f"{head}: FAILED: {result['error']} {tail}"
    score = result["score"]
    score_text = "n/a" if score is None else f"{score:.4f}"
    return (
        f"{head}: {result['metric']} {score_text}, {result['step_ms']['median']:.1f} ms/step {tail}"
    )


def time_left(pending: list[Cell], seconds: dict[str, list[float]], jobs: int) -> float:
    """Seconds until the cells still to run are done: each at the mean time of its task's
    finished cells (their costs differ several-fold with the tasks' lengths; a resumed grid
    knows them from its records), a task none has finished at the mean over all tasks."""
    known = [s for times in seconds.values() for s in times]
    if not known:
        return 0.0
    per_task = {task: statistics.mean(times) for task, times in seconds.items() if times}
    return sum(per_task.get(c.task, statistics.mean(known)) for c in pending) / jobs


def plan(config: BenchConfig, output: Path) -> tuple[list[Cell], list[Cell], list[Cell]]:
    """(all cells, finished cells, stale cells) of the grid in this folder."""
    grid = cells(config)
    finished, stale = [], []
    for cell in grid:
        record = read_record(output / CELLS / f"{cell.key}.json")
        if record is None:
            continue
        (finished if record.get("cell_hash") == cell.cell_hash() else stale).append(cell)
    return grid, finished, stale


def refuse_foreign_folder(output: Path) -> None:
    """A bench writes only into a new or empty folder or an earlier bench's (its bench.json is
    a bench record, or `bench tune` carved its data there): never over the user's own
    bench.json or beside their files."""
    record = output / "bench.json"
    if not output.is_dir() or not os.listdir(output) or (output / CARVED).is_file():
        return
    try:
        ours = set(json.loads(record.read_text(encoding="utf-8"))) >= {"config", "config_hash"}
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        shown = ", ".join(sorted(os.listdir(output))[:3])
        raise MicrotuneError(
            f"--output {output} is not a bench folder microtune wrote ({shown}); choose a new "
            "or empty folder"
        )


def _unfinished(config: BenchConfig, output: Path, echo: Callable[[str], None]) -> tuple:
    """(the grid, its cells still to run); stale records (other settings) are removed."""
    grid, finished, stale = plan(config, output)
    for cell in stale:
        echo(f"stale: {cell.key} was run with other settings; running it again")
        (output / CELLS / f"{cell.key}.json").unlink()
    done = {c.key for c in finished}
    return grid, [c for c in grid if c.key not in done]


def finished_seconds(grid: list[Cell], output: Path) -> dict[str, list[float]]:
    """What the grid's finished cells took, by task, from their records."""
    seconds: dict[str, list[float]] = {}
    for cell in grid:
        record = read_record(output / CELLS / f"{cell.key}.json")
        if record is not None and record.get("cell_time_s"):
            seconds.setdefault(cell.task, []).append(record["cell_time_s"])
    return seconds


def _checked_run(config: BenchConfig, output: Path, jobs: int) -> Path:
    """Refusals before any cell runs: the job count, the config, the output folder."""
    if jobs < 1:
        raise MicrotuneError(f"--jobs must be at least 1, got {jobs}")
    check_config(config)
    if output.exists() and not output.is_dir():
        raise MicrotuneError(f"--output {output} is a file; choose a folder")
    refuse_foreign_folder(output)
    return output


def run_bench(
    config: BenchConfig,
    output: str | os.PathLike,
    *,
    device: str = "auto",
    jobs: int = 1,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell of `config` into `output`; returns a summary.

    `threads` per worker defaults to the usable CPU cores divided by `jobs`. `on_result` sees
    each cell's record (or failure record) as it lands, e.g. to commit it."""
    output = _checked_run(config, Path(output), jobs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or max(1, (cores or 1) // jobs)
    write_json(
        output / "bench.json", {"config": config.to_dict(), "config_hash": config.config_hash()}
    )
    grid, todo = _unfinished(config, output, echo)
    echo(
        f"{config.name}: {len(grid)} cells, {len(grid) - len(todo)} finished, {len(todo)} to "
        f"run ({jobs} at once, {threads} threads each) in {output}"
    )
    started, failed, seconds = time.time(), [], finished_seconds(grid, output)
    with ThreadPoolExecutor(jobs) as pool:
        at_once = min(jobs, len(todo))  # what the cells' timings shared the cores with
        pending = {pool.submit(run_cell, c, output, device, threads, at_once): c for c in todo}
        for index, future in enumerate(as_completed(list(pending)), 1):
            result, cell = future.result(), pending.pop(future)
            seconds.setdefault(cell.task, []).append(result["_seconds"])
            if result.get("failed"):
                failed.append(result["cell"])
            eta = time_left(list(pending.values()), seconds, jobs)
            echo(progress_line(index, len(todo), result, eta))
            if on_result is not None:
                on_result(result)
    return {
        "output": str(output),
        "cells": len(grid),
        "ran": len(todo),
        "finished": len(grid) - len(failed),
        "failed": failed,
        "seconds": round(time.time() - started, 1),
    }
