"""How long `make demo` takes on this machine, on a fresh clone, and what it ends with.

Clones the repository (its committed HEAD) into a temporary folder and runs `make demo` there,
then prints the demo's figures as its guide states them: total minutes (install included),
training seconds and steps, SST-2 dev accuracy, trained numbers, artifact bytes, the export
check, and how much padding length-grouped batches save. To say how fast the machine is, it
also times one SLaSh training step of 32 SST-2 examples in uniformly shuffled batches (the
yardstick of issue #11: 0.37 s on one machine, 1.3 s on another), in the same process.

    python bench/demo_time.py [--data-dir ../shared/data] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def slash_step_seconds(data_dir: str, steps: int = 5) -> float:
    """Median seconds of one SLaSh step (batch 32, shuffled batches, max length 128)."""
    import statistics

    import torch

    from microtune.backbone.load import load_backbone
    from microtune.methods import build_method
    from microtune.model import HeadConfig, TaskModel
    from microtune.tasks.data import batches, encode
    from microtune.tasks.examples import load_examples
    from microtune.tasks.spec import get_task
    from microtune.tasks.types import loss_fn

    backbone, tokenizer = load_backbone()
    model = TaskModel(backbone, HeadConfig(num_labels=2), build_method("slash", {}))
    examples = load_examples(get_task("sst2"), "train", data_dir)[: 32 * (steps + 1)]
    rows = encode(tokenizer, examples, 128)
    labels = [e.label for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for batch, target in batches(rows, labels, 32, tokenizer.pad_token_id):
        started = time.perf_counter()
        loss = loss_fn(model(**batch), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first step warms up


def padded_token_ratio(data_dir: str) -> float:
    """Padded tokens of one SST-2 epoch in length-grouped batches of 32 ÷ in shuffled ones."""
    from microtune.backbone.load import load_backbone
    from microtune.tasks.data import encode
    from microtune.tasks.examples import load_examples
    from microtune.tasks.spec import get_task
    from microtune.training.samplers import LengthGroupedSampler, ShuffledSampler

    _, tokenizer = load_backbone()
    rows = encode(tokenizer, load_examples(get_task("sst2"), "train", data_dir), 128)
    lengths = tuple(len(row["input_ids"]) for row in rows)

    def padded(sampler) -> int:
        return sum(max(lengths[i] for i in batch) * len(batch) for batch in sampler.epoch(0))

    grouped = padded(LengthGroupedSampler(lengths, 32, seed=0))
    return grouped / padded(ShuffledSampler(len(lengths), 32, seed=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--keep", action="store_true", help="keep the clone and its runs")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())

    clone = Path(tempfile.mkdtemp(prefix="microtune-demo-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone / "microtune")], check=True)
    work = clone / "microtune"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    make = subprocess.run(
        ["make", "demo", f"DATA_DIR={data_dir}", f"PYTHON={sys.executable}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - started
    if make.returncode != 0:
        print(make.stdout[-3000:], make.stderr[-3000:], sep="\n")
        sys.exit(f"make demo failed with exit code {make.returncode}")
    run = work / "runs" / "sst2-slash"
    metrics = json.loads((run / "metrics.json").read_text())
    # `export` prints its check as JSON among the demo's output.
    found = re.search(r'"max_abs_logit_diff": ([-0-9.eE+a-zA-Z]+)', make.stdout)
    step = slash_step_seconds(data_dir)
    report = {
        "machine": f"{os.cpu_count()} cores, {cpu_name()}",
        "make_demo_minutes": round(total / 60, 2),
        "train_seconds": metrics["train_time_s"],
        "steps": metrics["steps"],
        "sst2_dev_accuracy": round(metrics["metrics"]["accuracy"], 4),
        "trained_numbers": metrics["trainable_parameters"],
        "artifact_bytes": metrics["artifact_bytes"],
        "export_max_abs_logit_diff": float(found.group(1)) if found else None,
        "slash_step_of_32_shuffled_s": round(step, 3),
        "padded_tokens_grouped_over_shuffled": round(padded_token_ratio(data_dir), 3),
    }
    print(json.dumps(report, indent=2))
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(clone, ignore_errors=True)


if __name__ == "__main__":
    main()
