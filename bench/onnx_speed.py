"""ONNX Runtime against the merged PyTorch model on this CPU (issue #21): dev-set inference time,
float32 and int8, interleaved in one run; int8's dev accuracy change and file size.

Loads an artifact, merges it, writes `export --format onnx` twice (float32, and int8 weights)
into a temporary folder, then times one pass over the dev rows (the same length-sorted batches
for every runtime) in rounds that interleave PyTorch, ONNX float32 and ONNX int8, so that all
three see the same machine state; prints medians, the ratios ONNX ÷ PyTorch (goal <= 0.7),
the dev metric of each against the labels, the largest |logit difference| from the unmerged
artifact, and int8's file size ÷ float32's. One thread for both runtimes unless --threads.

    python bench/onnx_speed.py --artifact runs/sst2 --data-dir ../shared/data [--rows 872]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from microtune.artifacts.store import load_artifact
from microtune.export.merged import check_rows, write_merged
from microtune.export.onnx import ONNX_FILE
from microtune.tasks.examples import load_split, task_from_record
from microtune.tasks.inference import predict, predict_with


def ort_forward(path: Path, threads: int):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]

    def forward(**inputs):
        feeds = {n: inputs[n].numpy().astype(np.int64) for n in names}
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    return forward


def accuracy(outputs: np.ndarray, labels) -> float:
    if outputs.shape[-1] == 1:  # regression: Pearson r instead
        return float(np.corrcoef(outputs[:, 0], np.asarray(labels, dtype=float))[0, 1])
    return float((outputs.argmax(-1) == np.asarray(labels)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--rows", type=int, default=872, help="dev rows (SST-2 has 872)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, config = load_artifact(args.artifact)
    task = task_from_record(config["task"])
    rows = check_rows(tokenizer, config, args.data_dir, args.rows)
    labels = [e.label for e in load_split(task, task.dev_split, args.data_dir, limit=args.rows)]
    pad = tokenizer.pad_token_id
    unmerged = predict(model, rows, pad)
    folder = Path(tempfile.mkdtemp(prefix="onnx-speed-"))
    for name, quantize in (("float32", None), ("int8", "int8")):
        fresh, _, _ = load_artifact(args.artifact)  # write_merged merges its model in place
        write_merged(fresh, tokenizer, config, folder / name, onnx=True, quantize=quantize)
    model.merge().eval()
    forwards = {
        "pytorch merged": lambda **inputs: model(**inputs),
        "onnx float32": ort_forward(folder / "float32" / ONNX_FILE, args.threads),
        "onnx int8": ort_forward(folder / "int8" / ONNX_FILE, args.threads),
    }
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    outputs = {}
    for _ in range(args.rounds):  # interleaved: each round runs every runtime once
        for name, forward in forwards.items():  # the same batches, the same collation
            start = time.perf_counter()
            outputs[name] = predict_with(forward, rows, pad)
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["pytorch merged"])
    sizes = {n: (folder / n / ONNX_FILE).stat().st_size for n in ("float32", "int8")}
    report = {
        "rows": len(rows),
        "threads": args.threads,
        "unmerged_metric": round(accuracy(unmerged, labels), 4),
        "runtimes": {
            name: {
                "median_s": round(statistics.median(times), 3),
                "spread_s": [round(min(times), 3), round(max(times), 3)],
                "over_pytorch_merged": round(statistics.median(times) / base, 3),
                "dev_metric": round(accuracy(outputs[name], labels), 4),
                "max_abs_logit_diff_vs_unmerged": float(abs(outputs[name] - unmerged).max()),
                "same_label_share_vs_unmerged": float(
                    (outputs[name].argmax(-1) == unmerged.argmax(-1)).mean()
                ),
            }
            for name, times in seconds.items()
        },
        "int8_metric_change_points": round(
            100 * (accuracy(outputs["onnx int8"], labels) - accuracy(unmerged, labels)), 2
        ),
        "int8_over_float32_file_size": round(sizes["int8"] / sizes["float32"], 3),
        "file_bytes": sizes,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
