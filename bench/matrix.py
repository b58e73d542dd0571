"""Quality, size and speed of methods × tasks × seeds, trained with the same budget.

Each run is one `microtune train` process (so runs cannot leak state into each other), several
at once with --jobs. The report gives, per method and task: the dev metric's mean and standard
deviation over seeds, trainable parameters (method + head), stored artifact bytes and the
median training step time; it is printed, and written as results.json, results.md and (with
matplotlib) quality_vs_parameters.png into --output.

    python bench/matrix.py --methods slash,jrwarp,warp --tasks sst2,rte --seeds 0,1,2 \\
        --max-steps 1000 --output runs/bench-prompts

A method entry may carry options after a colon, as `name:key=value+key=value`; each key is the
method's CLI flag without dashes (`lr` sets the learning rate), so one grid can hold variants:

    python bench/matrix.py --methods lora pafi:k=73728 pafi:k=73728+mask=largest --tasks sst2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from microtune.tasks import get_task


def parse_method(entry: str) -> tuple[str, list[str]]:
    """`pafi:k=73728+mask=largest` -> ("pafi", ["--k", "73728", "--mask", "largest"])."""
    name, _, options = entry.partition(":")
    flags: list[str] = []
    for option in filter(None, options.split("+")):
        key, _, value = option.partition("=")
        flag = "--" + key.replace("_", "-")
        if value.lower() in ("true", "false"):  # boolean flags are --x / --no-x
            flags.append(flag if value.lower() == "true" else "--no-" + flag[2:])
        else:
            flags += [flag, value]
    return name, flags


def run_one(args: argparse.Namespace, method: str, task: str, seed: int) -> dict:
    folder = Path(args.output) / "runs" / f"{method.replace(':', '_')}-{task}-s{seed}"
    method_name, method_flags = parse_method(method)
    if not (folder / "metrics.json").is_file():
        command = [
            sys.executable,
            "-m",
            "microtune",
            "train",
            "--task",
            task,
            "--method",
            method_name,
            *method_flags,
            "--output",
            str(folder),
            "--seed",
            str(seed),
            "--max-steps",
            str(args.max_steps),
            "--data-dir",
            args.data_dir,
            "--eval-every",
            "0",
            "--checkpoint-every",
            "0",
            "--no-progress",
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
        ]
        if args.model:
            command += ["--model", args.model]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"FAILED {method} {task} seed {seed}: {tail[0]}", flush=True)
            return {"method": method, "task": task, "seed": seed, "failed": tail[0]}
    report = json.loads((folder / "metrics.json").read_text())
    losses = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in losses if "loss" in r][-1]
    report["step_ms"] = 1000 * last["elapsed_s"] / last["step"]
    print(f"done {method:8} {task:5} seed {seed}: {report['metrics']}", flush=True)
    return {"method": method, "task": task, "seed": seed, **report}


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    keys = sorted(
        {(r["method"], r["task"]) for r in results if "failed" not in r}, key=lambda k: (k[1], k[0])
    )
    for method, task in keys:
        runs = [
            r for r in results if (r["method"], r["task"]) == (method, task) and "failed" not in r
        ]
        metric = get_task(task).main_metric
        scores = [r["metrics"][metric] for r in runs]
        rows.append(
            {
                "task": task,
                "method": method,
                "metric": metric,
                "seeds": len(runs),
                "mean": statistics.mean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "scores": scores,
                "trainable_method": runs[0]["trainable_parameters"]["method"],
                "trainable_head": runs[0]["trainable_parameters"]["head"],
                "artifact_bytes": runs[0]["artifact_bytes"],
                "step_ms": statistics.median(r["step_ms"] for r in runs),
                "device": runs[0].get("device", "?"),
            }
        )
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.max_steps} steps of batch {args.batch_size}, max length {args.max_length}, "
        f"seeds {args.seeds}, "
        f"device {rows[0]['device'] if rows else '?'}",
        "",
        "| task | method | metric | mean ± std | trainable (method + head) | stored bytes "
        "| step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['metric']} | {r['mean']:.4f} ± {r['std']:.4f} "
            f"| {r['trainable_method']:,} + {r['trainable_head']:,} | {r['artifact_bytes']:,} "
            f"| {r['step_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    tasks = sorted({r["task"] for r in rows})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in rows if r["task"] == task):
            trainable = r["trainable_method"] + r["trainable_head"]
            axis.errorbar(trainable, r["mean"], yerr=r["std"], fmt="o", capsize=3)
            axis.annotate(
                r["method"], (trainable, r["mean"]), textcoords="offset points", xytext=(5, 5)
            )
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (method + head, log scale)")
        axis.set_ylabel(
            rows[0]["metric"]
            if len(tasks) == 1
            else next(r["metric"] for r in rows if r["task"] == task)
        )
        axis.set_title(task)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["slash", "jrwarp", "warp"],
        help="method entries, space-separated: name or name:key=value+key=value",
    )
    parser.add_argument("--tasks", default="sst2,rte")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default=None, help="base model (default: packaged MiniLM)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--output", default="runs/bench-matrix")
    args = parser.parse_args()

    grid = [
        (m, t, int(s))
        for t in args.tasks.split(",")
        for entry in args.methods
        for m in (entry.split(",") if ":" not in entry else [entry])
        for s in args.seeds.split(",")
    ]
    started = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(args, *job), grid))
    rows = summarise(results)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    table = markdown(rows, args)
    (output / "results.md").write_text(table + "\n")
    print(table)
    print(f"{len(grid)} runs in {time.time() - started:.0f} s with {args.jobs} at once")
    plot(rows, output / "quality_vs_parameters.png")


if __name__ == "__main__":
    main()
