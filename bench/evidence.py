"""The evidence grid (issue #28): bench/configs/evidence.toml, in the background, committed as
each cell lands.

    nice -n 19 python bench/evidence.py [--jobs 2] [--results REPO] [--no-commit]
    python bench/evidence.py --measure-threads      # 2 cells at 1 thread vs 1 cell at 2
    python bench/evidence.py --publish              # docs/evidence.md from the records

Group by group (the claims' methods first, then the rest of the table), it tunes the group's
learning rates with `microtune bench tune` on slices of the training sets (skipped when the
rates file has them all), then runs every unfinished cell of the groups so far with the
ordinary bench runner, seed by seed. Each finished cell's record, and its artifact when that is
under 1 MB, is committed to REPO (default: this checkout) at once, with the report rebuilt
on every record so far (`microtune bench report`, published as docs/evidence.md and its
plots, and as the claims blocks of the README and the site's home page), so an interruption
loses only the cells that were running; the same command resumes.
Run it from a separate checkout of the code (a `git worktree`) to keep editing this one while
it runs: REPO then names this one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from microtune.bench.config import BenchConfig, Cell, cells, load_config, read_lrs
from microtune.bench.report import cpu_hours, report
from microtune.bench.runner import (
    CARVED,
    CELLS,
    RUNS,
    plan,
    read_record,
    read_records,
    run_bench,
)
from microtune.bench.tune import (
    carve,
    rate_means,
    tried_rates,
    tune,
    tuned_methods,
    tuning_config,
    tuning_tasks,
    widen,
)
from microtune.common.files import atomic_write

HERE = Path(__file__).resolve().parents[1]
CONFIG = HERE / "bench" / "configs" / "evidence.toml"
RESULTS = HERE / "bench" / "results" / "evidence"
TUNED = HERE / "bench" / "results" / "evidence-tune"  # apart: a bench folder holds one bench
FIRST_TUNED = HERE / "bench" / "results" / "evidence-tune-200steps"  # superseded, kept
GROUPS = (
    ("slash", "full", "lora", "pafi", "hiwi"),
    ("jrwarp", "bitfit", "linear", "pafi-random", "peft-vera", "peft-unilora-8k"),
)
ARTIFACT_LIMIT = 1 << 20  # bytes: `full` (90 MB) stays out of git
ARTIFACT_FILES = ("microtune.json", "adapter.safetensors", "metrics.json")
PAGE = Path("docs") / "evidence.md"
IMAGES = Path("docs") / "img" / "evidence"
# The pages whose block states the claims, with the evidence page's address from each: the
# report's table, rewritten on each publish, so they say what the grid has settled so far and
# never more.
CLAIM_PAGES = {Path("README.md"): "docs/evidence.md", Path("docs") / "index.md": "evidence.md"}
CLAIMS_BLOCK = re.compile(
    r"(<!-- evidence-claims:start[^>]*-->\n).*?(<!-- evidence-claims:end -->)", re.S
)
PLOT_EVERY = 10  # cells between two refreshes of the page's plots
NOTHING_YET = """
No cell of the grid has finished yet: the learning rates are being tuned first ({tuned} tuning
records so far, in bench/results/evidence-tune/).
"""
TITLE = """# The evidence: five GLUE tasks, on a CPU

The claims of the two papers microtune implements (issue #28), measured with the protocol of
the [results page](results.md) on the packaged MiniLM: SST-2, CoLA, MRPC, RTE and STS-B, three
seeds of the claims' methods and one of the rest, each learning rate tuned on a slice of the
training set (never dev). This page is rebuilt from the cell records each time a cell lands:
a grid still running shows the cells so far, and a method's task mean waits until it has run
every task.

<!-- not run: the grid is hours of CPU (its records are in bench/results/evidence/cells) -->
```bash
nice -n 19 python bench/evidence.py            # tune, run, commit each cell as it lands
microtune bench report bench/results/evidence   # the report below
microtune bench reproduce bench/results/evidence lora-cola-s0 --cpu-capability avx2  # a check
```
"""


def git(repo: Path, *words: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), *words], capture_output=True).returncode == 0


def commit(repo: Path, paths: list[Path], message: str) -> None:
    """Commit only `paths`, written or removed (other staged work stays staged); retried while
    git is busy."""
    names = [str(p.relative_to(repo)) for p in paths if p.exists() or tracked(repo, p)]
    for _ in range(20):
        added = git(repo, "add", "-A", "--", *names)
        if added and git(repo, "commit", "-q", "-m", message, "--", *names):
            return
        if not git(repo, "diff", "--cached", "--quiet", "--", *names):
            time.sleep(3)  # another git command holds the index: try again
            continue
        return  # nothing new to commit
    print(f"evidence: could not commit {names}", file=sys.stderr)


def tracked(repo: Path, path: Path) -> bool:
    return git(repo, "ls-files", "--error-unmatch", "--", str(path.relative_to(repo)))


def drop_stale(config: BenchConfig, results: Path, repo: Path, commit_cells: bool) -> None:
    """Remove the records and artifacts of cells whose settings changed (a new learning rate)
    and commit that with the page, before they run again: git never holds a stale record."""
    _, _, stale = plan(config, results)
    gone = [results / CELLS / f"{c.key}.json" for c in stale]
    gone += [results / "artifacts" / c.key for c in stale]
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if stale and commit_cells:
        names = ", ".join(c.key for c in stale)
        commit(repo, [*gone, *publish(repo, plots=False)], f"Evidence: to run again ({names})")


def keep_artifact(record: dict, output: Path) -> Path | None:
    """Copy the cell's artifact to artifacts/<cell>/ when it is under the limit."""
    run = output / RUNS / record["cell"]
    files = [run / name for name in ARTIFACT_FILES if (run / name).is_file()]
    if not files or sum(f.stat().st_size for f in files) > ARTIFACT_LIMIT:
        return None
    target = output / "artifacts" / record["cell"]
    target.mkdir(parents=True, exist_ok=True)
    for source in files:
        shutil.copy2(source, target / source.name)
    return target


def publish(repo: Path, plots: bool = True) -> list[Path]:
    """docs/evidence.md from `microtune bench report` over REPO's records, and its plots when
    `plots` or when they are missing (each plot is ~80 KB: refreshed every PLOT_EVERY cells,
    not each, to keep the history small); returns the docs files written."""
    results = repo / RESULTS.relative_to(HERE)
    page = repo / PAGE
    if not list((results / CELLS).glob("*.json")):
        tuned = len(list((repo / TUNED.relative_to(HERE)).glob("*.json")))
        write_page(page, TITLE + NOTHING_YET.format(tuned=tuned))
        return [page]
    written = report(results)
    images = repo / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    text = Path(written["report"]).read_text(encoding="utf-8")
    text = text.replace(str(results), str(RESULTS.relative_to(HERE)))
    text = TITLE + text.split("\n", 1)[1]  # our title instead of "# Bench: evidence"
    copies = []
    for plot in map(Path, written["plots"]):
        if plots or not (images / plot.name).is_file():
            copies.append(Path(shutil.copy2(plot, images / plot.name)))
        text = text.replace(f"]({plot.name})", f"]({IMAGES.relative_to('docs') / plot.name})")
    text = text.replace("\n## Plots", rates_section(repo) + "\n## Plots")
    write_page(page, text)
    cells_so_far = len(list((results / CELLS).glob("*.json")))
    return [page, *copies, *state_claims(repo, text, cells_so_far)]


def state_claims(repo: Path, page: str, cells_so_far: int) -> list[Path]:
    """Rewrite each of CLAIM_PAGES' claims block from the page's "## Claims" table; returns
    the pages that changed."""
    if "\n## Claims\n" not in page:
        return []
    claims = page.split("\n## Claims\n", 1)[1].split("\n## ", 1)[0].strip("\n")
    changed = []
    for name, address in CLAIM_PAGES.items():
        path = repo / name
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        block = CLAIMS_BLOCK.search(text)
        if block is None:
            continue
        source = f"\n\n(From the [evidence page]({address})'s {cells_so_far} cells so far.)\n"
        new = text[: block.start()] + block.group(1) + claims + source + block.group(2)
        new += text[block.end() :]
        if new != text:
            write_page(path, new)
            changed.append(path)
    return changed


def rates_section(repo: Path) -> str:
    """Every rate each method was tuned at, with its mean score on the slices: the rate the
    grid runs with in bold, and where it sits in the grid (one at an edge may be mistuned)."""
    config = load_config(CONFIG, tuned=False)
    kept = repo / TUNED.relative_to(HERE)
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(kept.glob("*.json"))]
    lrs_file = repo / "bench" / "configs" / Path(config.lrs).name
    running = read_lrs(str(lrs_file)) if lrs_file.is_file() else {}
    settings = config.tune
    steps = settings.protocol.get("max_steps", config.protocol.max_steps)
    lines = [
        "\n## Learning rates\n",
        f"Tuned by `microtune bench tune`: {steps:,} steps of each method at each rate on "
        f"{', '.join(tuning_tasks(config))}, scored on a seeded slice of each training set "
        f"({settings.slice_fraction:.0%}, at most {settings.slice_max:,} examples; the rest "
        f"trains), seeds {list(settings.seeds)}; the mean main metric over those tasks. Bold: "
        "the rate the grid runs with. A first tuning of 200 steps on all five tasks chose higher "
        "rates, at which 1,000-step cells collapsed (LoRA at 4e-3: CoLA's Matthews correlation "
        "0, MRPC one class): short runs favour high rates, so tuning now runs the grid's own "
        "protocol (its records: bench/results/evidence-tune-200steps).\n",
        "| method | rate: mean score on the slices | the rate run |",
        "|---|---|---|",
    ]
    for entry in tuned_methods(config):
        grid = tried_rates(entry, settings.factors, records)
        means = rate_means(config, entry, records, echo=lambda _: None)
        # Until the group's tuning writes the rates file, it holds an earlier tuning's choice.
        best = max(means, key=means.get) if len(means) == len(grid) else None
        chosen = best if running.get(entry.label) == best else None
        tried = [f"{lr:g}: {means[lr]:.4f}" if lr in means else f"{lr:g}: –" for lr in grid]
        tried = [f"**{t}**" if lr == chosen else t for lr, t in zip(grid, tried, strict=True)]
        edges = {grid[0]: "the grid's lowest", grid[-1]: "the grid's highest"}
        where = edges.get(chosen, "inside") if chosen in grid else "tuning"
        lines.append(f"| {entry.label} | {' · '.join(tried)} | {where} |")
    return "\n".join([*lines, "", tuning_cost(repo, records)]) + "\n"


def tuning_cost(repo: Path, records: list[dict]) -> str:
    """The tuning's CPU hours, the first (200-step) tuning's included, and the evidence's
    total: the grid's cells and both tunings."""
    first = repo / FIRST_TUNED.relative_to(HERE)
    earlier = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(first.glob("*.json"))]
    grid = read_records(repo / RESULTS.relative_to(HERE))
    hours = [cpu_hours(grid), cpu_hours(records), cpu_hours(earlier)]
    return (
        f"CPU hours of the tuning: {hours[1]:.1f} over {len(records)} runs, and "
        f"{hours[2]:.1f} over the first tuning's {len(earlier)} runs. All told so far: "
        f"{sum(hours):.1f} CPU hours ({hours[0]:.1f} for the grid's {len(grid)} cells, "
        f"{hours[1] + hours[2]:.1f} for the tunings)."
    )


def write_page(page: Path, text: str) -> None:
    """Replace the page whole (a docs build never reads half of one)."""
    atomic_write(page, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def current(folder: Path, cell: Cell) -> bool:
    """The folder holds the cell's record, run with the cell's settings."""
    record = read_record(folder / f"{cell.key}.json")
    return record is not None and record.get("cell_hash") == cell.cell_hash()


def tune_group(group: tuple[str, ...], lrs: Path, scratch: Path, jobs: int, kept: Path, repo):
    """Tune the group's rates unless the rates file has them all, every tuning cell of the
    config is kept with today's settings and no best rate is at an edge `tune.extend` would
    grow past (a grid widened or a protocol changed in the config tunes again). Each tuning
    cell's record is kept in `kept` (and committed, with a `repo`) as it lands, and put back
    into the scratch folder first, so a new checkout resumes the tuning too."""
    overrides = {"only": list(group), "lrs": str(lrs), "tune": {"write": str(lrs)}}
    config = load_config(CONFIG, overrides, tuned=False)
    wanted = {m.label for m in tuned_methods(config)}
    untuned = [c for c in cells(tuning_config(config, "")) if not current(kept, c)]
    records = [json.loads(p.read_text(encoding="utf-8")) for p in kept.glob("*.json")]
    edged = widen(config, records, set())  # `tune.extend` has a rate to add
    if lrs.is_file() and wanted <= set(read_lrs(str(lrs))) and not untuned and not edged:
        return
    kept.mkdir(parents=True, exist_ok=True)
    # Carve first: the bench refuses a folder that holds records but is not yet a bench folder.
    carve(config, (scratch / CARVED).parent)
    (scratch / CELLS).mkdir(parents=True, exist_ok=True)
    for record in kept.glob("*.json"):  # a new checkout: resume from the committed records
        if not (scratch / CELLS / record.name).exists():
            shutil.copy2(record, scratch / CELLS / record.name)
    unkept = [p for p in (scratch / CELLS).glob("*.json") if not (kept / p.name).exists()]
    for record in unkept:  # finished before an interruption, never committed
        shutil.copy2(record, kept / record.name)
    if unkept and repo is not None:
        commit(repo, [kept / p.name for p in unkept], f"Evidence tuning: {len(unkept)} records")

    def land(record: dict) -> None:
        if record.get("failed"):
            return
        path = kept / f"{record['cell']}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        if repo is not None:
            commit(repo, [path], f"Evidence tuning: {record['cell']} {record['score']}")

    tune(CONFIG, scratch, jobs=jobs, overrides=overrides, on_result=land)
    if repo is not None:
        commit(repo, [lrs], f"Evidence: learning rates of {', '.join(group)} (bench tune)")


def run_grid(repo: Path, jobs: int, commit_cells: bool) -> None:
    results = repo / RESULTS.relative_to(HERE)
    lrs = repo / "bench" / "configs" / "evidence-lrs.toml"
    scratch = HERE / "runs" / "evidence-tune"
    labels: list[str] = []
    for group in GROUPS:
        kept = repo / TUNED.relative_to(HERE)
        tune_group(group, lrs, scratch, jobs, kept, repo if commit_cells else None)
        labels += group
        config = load_config(CONFIG, {"only": labels, "lrs": str(lrs)})

        def land(record: dict) -> None:
            if record.get("failed") or not commit_cells:
                return
            paths = [results / CELLS / f"{record['cell']}.json", results / "bench.json"]
            artifact = keep_artifact(record, results)
            paths += [artifact] if artifact else []
            paths += publish(
                repo, plots=len(list((results / CELLS).glob("*.json"))) % PLOT_EVERY == 0
            )
            score = record["score"]
            shown = "n/a" if score is None else f"{score:.4f}"
            commit(repo, paths, f"Evidence: {record['cell']} {record['metric']} {shown}")

        drop_stale(config, results, repo, commit_cells)
        run_bench(config, results, jobs=jobs, on_result=land)


def measure_threads(steps: int) -> None:
    """Two RTE cells of SLaSh: both at once at one thread each, then one after the other at
    two threads each; prints both wall times and their ratio."""
    overrides = {
        "only": ["slash"],
        "tasks": ["rte"],
        "seeds": [0, 1],
        "lrs": "",
        "protocol": {"max_steps": steps},
    }
    config = load_config(CONFIG, overrides)
    seconds = {}
    for jobs in (2, 1):
        folder = HERE / "runs" / f"evidence-threads-{jobs}"
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        run_bench(config, folder, jobs=jobs, threads=2 // jobs)
        seconds[jobs] = time.perf_counter() - started
    print(
        f"2 cells of {steps} RTE steps: 2 at once x 1 thread {seconds[2]:.0f} s; "
        f"1 at a time x 2 threads {seconds[1]:.0f} s; ratio {seconds[1] / seconds[2]:.2f} "
        "(> 1: two at once finish sooner)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cells at once (threads: cores/jobs)")
    parser.add_argument("--results", type=Path, default=HERE, help="the checkout to commit to")
    parser.add_argument("--no-commit", action="store_true")
    parser.add_argument("--measure-threads", type=int, nargs="?", const=100, metavar="STEPS")
    parser.add_argument("--publish", action="store_true", help="only rebuild docs/evidence.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(HERE)  # the config's data_dir is relative to the repository root
    if args.measure_threads:
        measure_threads(args.measure_threads)
    elif args.publish:
        print("\n".join(map(str, publish(args.results.resolve()))))
    else:
        run_grid(args.results.resolve(), args.jobs, not args.no_commit)


if __name__ == "__main__":
    main()
