"""A finished cell trained again from the `microtune train` command its record names, in a
fresh process with the record's thread count, and the two dev scores compared:
`microtune bench reproduce FOLDER CELL...`.

Each check is written to FOLDER/reproduced/<cell>[-<capability>].json (the report's
reproduction table); the re-run's scratch folder is removed once its score is read.
`cpu_capability="avx2"` runs torch's, MKL's and oneDNN's AVX2 kernels on a CPU that has
AVX-512, so that one machine can check what a CPU without it would score.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from microtune.bench.runner import CELLS, LOGS, read_record, worker_environment
from microtune.bench.timing import cpu_model, versions
from microtune.common.files import METRICS_FILE, write_json
from microtune.errors import MicrotuneError

REPRODUCED = "reproduced"
TOLERANCE = 0.005  # the largest difference of dev scores a re-run on any CPU may show
CAPABILITY_ENV = {  # torch's, MKL's and oneDNN's switches to their AVX2 kernels
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}


def rerun_command(record: dict[str, Any], output: Path, data_dir: str | None) -> list[str]:
    """The record's `microtune train` command, writing to `output` (and reading `data_dir`
    when given), run by this Python."""
    words = shlex.split(record.get("train_command") or "")
    if words[:2] != ["microtune", "train"]:
        raise MicrotuneError(
            f"{record.get('cell')}: its record names no `microtune train` command "
            "(written by an older microtune); run the cell again with `microtune bench run`"
        )
    words = _with_value(words, "--output", str(output))
    if data_dir is not None:
        words = _with_value(words, "--data-dir", data_dir)
    return [sys.executable, "-m", "microtune", *words[1:]]


def _with_value(words: list[str], flag: str, value: str) -> list[str]:
    if flag not in words:
        return [*words, flag, value]
    at = words.index(flag) + 1
    return [*words[:at], value, *words[at + 1 :]]


def kernels(env: dict[str, str]) -> str:
    """torch's name for the CPU kernels a process with this environment runs (AVX512, AVX2,
    DEFAULT): this CPU's best unless the environment asks for less."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def reproduce_cell(
    folder: Path, name: str, data_dir: str | None = None, cpu_capability: str | None = None
) -> dict[str, Any]:
    """Train cell `name` of bench folder `folder` again from its record's command; returns
    (and writes to reproduced/) both scores and their difference."""
    found = sorted(p.stem for p in (folder / CELLS).glob("*.json"))
    record = read_record(folder / CELLS / f"{name}.json") if name in found else None
    if record is None:  # a name outside the list (`../x`) never becomes a path
        raise MicrotuneError(
            f"{folder / CELLS} has no record of cell {name!r}; finished cells: "
            + (", ".join(found) or "none")
        )
    scratch = folder / REPRODUCED / "runs" / name
    shutil.rmtree(scratch, ignore_errors=True)
    command = rerun_command(record, scratch, data_dir)
    env = worker_environment(record.get("threads") or 1)
    env.update(CAPABILITY_ENV.get(cpu_capability or "", {}))
    log = folder / REPRODUCED / LOGS / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not (scratch / METRICS_FILE).is_file():
        raise MicrotuneError(f"the re-run of {name} failed (exit {done.returncode}); see {log}")
    metrics = json.loads((scratch / METRICS_FILE).read_text(encoding="utf-8"))["metrics"]
    shutil.rmtree(scratch)
    score = metrics[record["metric"]]
    check = {
        "cell": name,
        "cell_hash": record["cell_hash"],
        "metric": record["metric"],
        "recorded": record["score"],
        "rerun": score,
        "difference": score - record["score"],
        "within": abs(score - record["score"]) <= TOLERANCE,
        "command": shlex.join(["microtune", *command[3:]]),
        "threads": record.get("threads") or 1,
        "kernels": kernels(env),
        "cpu": cpu_model(),
        "recorded_cpu": record["hardware"]["cpu"],
        "versions": versions(),
        "seconds": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    suffix = f"-{cpu_capability}" if cpu_capability else ""
    write_json(folder / REPRODUCED / f"{name}{suffix}.json", check)
    return check


def reproduce(
    folder: str | Path,
    names: list[str],
    data_dir: str | None = None,
    cpu_capability: str | None = None,
) -> dict[str, Any]:
    """Each named cell trained again (see `reproduce_cell`); `within` is True when every
    re-run's dev score is within TOLERANCE of its record's."""
    if cpu_capability is not None and cpu_capability not in CAPABILITY_ENV:
        raise MicrotuneError(
            f"cpu capability {cpu_capability!r} is not one of: {', '.join(CAPABILITY_ENV)}"
        )
    checks = [reproduce_cell(Path(folder), n, data_dir, cpu_capability) for n in names]
    return {"checks": checks, "tolerance": TOLERANCE, "within": all(c["within"] for c in checks)}


def read_checks(folder: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reproduction checks of the current records (a check of a cell that has since run
    with other settings is left out)."""
    hashes = {r["cell"]: r["cell_hash"] for r in records}
    checks = [read_record(p) for p in sorted((folder / REPRODUCED).glob("*.json"))]
    return [c for c in checks if c and hashes.get(c.get("cell")) == c.get("cell_hash")]
