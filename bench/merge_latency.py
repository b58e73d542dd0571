"""Inference time of a merged SLaSh model against the base model, side by side in one run.

Loads an artifact (or, without one, a SLaSh model with a random z on the packaged MiniLM),
then times three backbones on the same SST-2 dev batches, interleaved round by round so that
all three see the same machine state: the base model, the unmerged model (shifts added by
hooks) and the merged model (shifts folded into biases). Prints seconds and ratios to base,
and the max |logit difference| between merged and unmerged.

    python bench/merge_latency.py [--artifact runs/sst2-slash] [--rounds 5] [--examples 872]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from microtune.api import time_forward
from microtune.artifact import load_artifact
from microtune.data import batches, encode
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel, load_backbone
from microtune.tasks import get_task, load_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="artifact folder (default: random-z SLaSh)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--examples", type=int, default=872, help="SST-2 dev examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    if args.artifact:
        unmerged, tokenizer, _ = load_artifact(args.artifact)
    else:
        backbone, tokenizer = load_backbone()
        unmerged = TaskModel(backbone, HeadConfig(num_labels=2), build_method("slash"))
    unmerged.eval()
    merged = copy.deepcopy(unmerged).merge().eval()
    base_backbone, _ = load_backbone(unmerged.backbone.name_or_path)
    # The base model with the same read-out and head, so only the backbones differ.
    base = TaskModel(base_backbone, unmerged.head_config).eval()

    dev = load_examples(get_task("sst2"), "validation", args.data_dir)[: args.examples]
    rows = encode(tokenizer, dev)
    inputs = [b for b, _ in batches(rows, [0] * len(rows), args.batch_size, tokenizer.pad_token_id)]
    with torch.no_grad():
        difference = max((unmerged(**b) - merged(**b)).abs().max().item() for b in inputs)

    contenders = {"base": base, "unmerged": unmerged, "merged": merged}
    seconds = {name: [] for name in contenders}
    time_forward(base, inputs[:1], 1)  # warm-up
    for _ in range(args.rounds):
        for name, model in contenders.items():
            seconds[name].append(time_forward(model, inputs, 1))

    base_median = statistics.median(seconds["base"])
    print(
        f"{len(rows)} SST-2 dev examples, batch {args.batch_size}, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'model':<10} {'median s':>9} {'min s':>8} {'÷ base':>7}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>9.3f} {min(values):>8.3f} {median / base_median:>7.3f}")
    print(f"max |logit merged - unmerged| = {difference:.2e}")
    print(
        f"backbone parameters: base {sum(p.numel() for p in base.backbone.parameters()):,}, merged "
        f"{sum(p.numel() for p in merged.backbone.parameters()):,}"
    )


if __name__ == "__main__":
    main()
