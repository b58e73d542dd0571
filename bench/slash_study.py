"""Issue #28, item 5: the SLaSh study's table, from `bench/configs/slash-study.toml`'s records.

    taskset -c 1 microtune bench tune bench/configs/slash-study.toml --output runs/slash-study
    python bench/slash_study.py runs/slash-study            # the markdown table
    python bench/slash_study.py runs/slash-study --keep bench/results/slash-study

Each variant changes one thing of the SLaSh default and trains the evidence protocol on the
training sets less a seeded slice, scored on that slice (never dev). Beside each score: the
mean training loss of the run's last 100 steps (from its train_log.jsonl), which says whether a
variant fits the training data better or only scores differently. `--keep` copies the records
and those logs to a folder to commit (the logs are a few KB each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

LAST_STEPS = 100


def final_loss(log: Path) -> float | None:
    """The mean logged training loss over the last LAST_STEPS steps."""
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"loss"' in line]
    if not rows:
        return None
    last = rows[-1]["step"]
    return statistics.mean(r["loss"] for r in rows if r["step"] > last - LAST_STEPS)


def load(folder: Path) -> list[dict]:
    records = []
    for path in sorted((folder / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        for log in (folder / "runs" / record["cell"], folder / "train_logs" / record["cell"]):
            loss = final_loss(log / "train_log.jsonl")
            if loss is not None:
                record["final_loss"] = loss
                break
        records.append(record)
    return records


def table(records: list[dict], order: list[str]) -> list[str]:
    """Variants (in the bench file's order) by tasks: score, mean, ÷ full, final loss."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    found = {r["label"].split("@")[0] for r in records}
    labels = [label for label in dict.fromkeys(order) if label in found]
    by = {(r["label"].split("@")[0], r["task"]): r for r in records}
    reference = {t: by[("full", t)]["score"] for t in tasks if ("full", t) in by}
    metric = {r["task"]: r["metric"] for r in records}
    head = " | ".join(f"{t} {metric[t]}" for t in tasks)
    losses = " | ".join(f"{t} train loss" for t in tasks)
    lines = [f"| variant | {head} | mean | ÷ full | {losses} |"]
    lines.append("|---" * (2 * len(tasks) + 3) + "|")
    for label in labels:
        mine = [by.get((label, t)) for t in tasks]
        scores = [r["score"] if r else None for r in mine]
        done = None not in scores
        mean = statistics.mean(scores) if done else None
        ratio = (
            mean / statistics.mean(reference.values())
            if done and len(reference) == len(tasks)
            else None
        )
        cells = [f"{s:.4f}" if s is not None else "–" for s in scores]
        cells += [f"{mean:.4f}" if mean is not None else "–", f"{ratio:.3f}" if ratio else "–"]
        cells += [f"{r['final_loss']:.3f}" if r and "final_loss" in r else "–" for r in mine]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def keep(folder: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / "bench.json", target / "bench.json")
    for record in sorted((folder / "cells").glob("*.json")):
        (target / "cells").mkdir(parents=True, exist_ok=True)
        shutil.copy2(record, target / "cells" / record.name)
        log = folder / "runs" / record.stem / "train_log.jsonl"
        if log.is_file():
            (target / "train_logs" / record.stem).mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, target / "train_logs" / record.stem / log.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the study's `bench tune --output` folder")
    parser.add_argument("--keep", type=Path, help="copy the records and train logs here")
    args = parser.parse_args()
    if args.keep:
        keep(args.folder, args.keep)
    planned = json.loads((args.folder / "bench.json").read_text())["config"]["methods"]
    order = [m["label"].split("@")[0] for m in planned]
    print("\n".join(table(load(args.folder), order)))


if __name__ == "__main__":
    main()
