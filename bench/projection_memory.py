"""Peak training memory and step time: stored against memory-lean projections, side by side.

For SLaSh and JR-WARP on the packaged MiniLM, at d = 1024 and d = 8192, each configuration
trains a few AdamW steps on batches of real SST-2 training sentences, and the script prints one
table with the figures and the lean/stored ratios.

How memory is measured (CPU): every configuration runs in its own fresh subprocess, so no
allocation of one can hide or inflate another. The worker loads the backbone, tokenizer and
batches, collects garbage and reads its resident set size (VmRSS). It then resets the kernel's
high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so a transient peak while
loading weights cannot mask the training peak (one no-grad forward pass before that reading
pages in the weights and warms the kernels); builds the method (this is where stored
projections are allocated) and the optimizer; and trains. The figure reported is
`resource.getrusage(RUSAGE_SELF).ru_maxrss` after the last step minus that RSS before training:
the peak memory that building and training the method added. Where the reset is refused, the
table says so: the figure may then be the loading peak instead of the training peak. Workers
run with glibc's MALLOC_MMAP_THRESHOLD_=131072, so every large tensor gets its own mapping and
goes back to the OS when freed: RSS then follows live tensors, not what the allocator keeps
(with glibc's adaptive default, freed projection-sized buffers linger and blur the figures).
The projection matrices' own size, 4 d (sum of widths) bytes, is printed for reference.

Step time is the median over the timed steps (after one untimed warm-up step) of forward,
backward and optimizer step. Configurations run stored then lean for each (method, d), so each
pair sees similar machine load.

    python bench/projection_memory.py                      # the default run, ~2-3 min on 2 cores
    python bench/projection_memory.py --steps 2 --d 1024   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "train.jsonl"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="slash,jrwarp", help="comma-separated")
    parser.add_argument("--d", default="1024,8192", help="comma-separated lengths of z")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--data-file", default=str(DATA_FILE))
    parser.add_argument("--json", help="also write the results to this JSON file")
    # Internal: run one configuration and print its result as one JSON line.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-lean", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    import torch

    from microtune.backbone.load import load_backbone
    from microtune.methods import build_method
    from microtune.model import HeadConfig, TaskModel
    from microtune.tasks.types import loss_fn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone()
    needed = args.batch_size * (args.steps + 1)
    with open(args.data_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(needed), handle, strict=False)]
    batches = []
    for start in range(0, needed, args.batch_size):
        chunk = rows[start : start + args.batch_size]
        encoded = tokenizer(
            [r["sentence"] for r in chunk],
            padding=True,
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([r["label"] for r in chunk])
        batches.append(({k: encoded[k] for k in ("input_ids", "attention_mask")}, labels))

    # Touch the weights (possibly memory-mapped) and warm the kernels before the baseline, so
    # the measured peak is what the method and its training add, not first-use costs.
    with torch.no_grad():
        backbone(**batches[0][0])
    gc.collect()
    before_kib = rss_kib()
    reset = reset_peak_rss()
    method = build_method(args.methods, {"d": int(args.d), "memory_lean": args.memory_lean})
    model = TaskModel(backbone, HeadConfig(num_labels=2), method)
    optimizer = torch.optim.AdamW(model.trainable_state().values(), lr=1e-3)
    model.train()
    seconds = []
    for inputs, labels in batches:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(**inputs), labels).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": args.methods,
        "d": int(args.d),
        "memory_lean": args.memory_lean,
        "peak_added_mib": (peak_kib - before_kib) / 1024,
        "rss_before_mib": before_kib / 1024,
        "peak_reset": reset,
        "step_s": statistics.median(seconds[1:]),  # the first step is warm-up
        "projection_mib": 4 * int(args.d) * sum(method.bank.widths) / 2**20,
        "tokens_per_batch": int(batches[0][0]["input_ids"].numel()),
    }


def run_worker(args: argparse.Namespace, method: str, d: int, lean: bool) -> dict:
    command = [sys.executable, __file__, "--worker", "--methods", method, "--d", str(d)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    command += ["--max-length", str(args.max_length), "--threads", str(args.threads)]
    command += ["--data-file", args.data_file] + (["--memory-lean"] if lean else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {method} d={d} lean={lean} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    header = (
        f"{'method':<7} {'d':>5} {'W_l MiB':>8} | {'peak MiB stored':>15} {'lean':>7} "
        f"{'saved':>7} {'ratio':>6} | {'step s stored':>13} {'lean':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    pairs: dict[tuple[str, int], dict[bool, dict]] = {}
    for result in results:
        pairs.setdefault((result["method"], result["d"]), {})[result["memory_lean"]] = result
    for (method, d), pair in pairs.items():
        stored, lean = pair[False], pair[True]
        print(
            f"{method:<7} {d:>5} {stored['projection_mib']:>8.1f} | "
            f"{stored['peak_added_mib']:>15.1f} {lean['peak_added_mib']:>7.1f} "
            f"{stored['peak_added_mib'] - lean['peak_added_mib']:>7.1f} "
            f"{lean['peak_added_mib'] / stored['peak_added_mib']:>6.2f} | "
            f"{stored['step_s']:>13.3f} {lean['step_s']:>7.3f} "
            f"{lean['step_s'] / stored['step_s']:>6.2f}"
        )
    first = results[0]
    print(
        f"\npeak MiB: peak RSS added by building + training the method (ru_maxrss after the "
        f"steps minus RSS before), each configuration in its own process; saved = stored - lean; "
        f"ratio = lean/stored."
        f"\nW_l MiB: size of the stored projections. Batch: {first['tokens_per_batch']} tokens "
        f"of SST-2 train sentences; step s: median over the timed steps."
    )
    if not all(r["peak_reset"] for r in results):
        print("WARNING: the peak-RSS reset was refused; peaks may include model loading.")


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for method in args.methods.split(","):
        for d in (int(v) for v in args.d.split(",")):
            for lean in (False, True):
                results.append(run_worker(args, method, d, lean))
                print(f"  done {method} d={d} lean={lean}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
