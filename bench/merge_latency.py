"""Inference time of a merged SLaSh model against the base model, side by side in one run.

Loads an artifact (or, without one, a SLaSh model with a random z on the packaged MiniLM),
then times three models on the same SST-2 dev batches, interleaved round by round so that
all three see the same machine state (`microtune.bench.timing.inference_times`, as every
`microtune bench` cell does): the base model, the unmerged model (shifts added by hooks) and
the merged model (shifts folded into biases). Prints the median seconds with their spread and
ratios to base, and the max |logit difference| between merged and unmerged.

    python bench/merge_latency.py [--artifact runs/sst2-slash] [--rounds 5] [--examples 872]
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from microtune.artifacts.store import load_artifact
from microtune.backbone.load import load_backbone
from microtune.bench.timing import inference_times
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.data import batches, encode
from microtune.tasks.examples import load_examples
from microtune.tasks.spec import get_task


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
    times = inference_times(contenders, inputs, args.rounds, "cpu")
    print(
        f"{len(rows)} SST-2 dev examples, batch {args.batch_size}, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'model':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'÷ base':>7}")
    for name, t in times.items():
        print(
            f"{name:<10} {t['median']:>9.3f} {t['min']:>8.3f} {t['max']:>8.3f} "
            f"{t['over_base']:>7.3f}"
        )
    print(f"max |logit merged - unmerged| = {difference:.2e}")
    print(
        f"backbone parameters: base {sum(p.numel() for p in base.backbone.parameters()):,}, merged "
        f"{sum(p.numel() for p in merged.backbone.parameters()):,}"
    )


if __name__ == "__main__":
    main()
