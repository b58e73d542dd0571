"""A short real token-classification run: CoNLL-2003 NER on the packaged MiniLM.

Trains one method on the first N training sentences for a few steps, then prints the dev
entity F1 (seqeval, BIO spans) next to the all-O baseline (no entity predicted: F1 0.0),
with the trainable numbers, the artifact's bytes and the training time, measured in one run.

    python bench/conll_ner.py [--method slash] [--steps 100] [--train-sentences 2000]
        [--data-dir ../shared/data] [--output /tmp/conll-run]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def all_o_f1(data_dir: str) -> float:
    """Entity F1 of predicting O for every word of the dev set."""
    from seqeval.metrics import f1_score

    text = (Path(data_dir) / "ner/conll2003/validation.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    gold = [r["ner_tags"] for r in rows]
    return float(f1_score(gold, [["O"] * len(tags) for tags in gold], zero_division=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="slash")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from microtune.api import train
    from microtune.tasks.spec import DataSource
    from microtune.training.config import TrainConfig

    output = args.output or tempfile.mkdtemp(prefix="conll-")
    report = train(
        "conll2003",
        args.method,
        output,
        data=DataSource(data_dir=args.data_dir, max_train_examples=args.train_sentences),
        train_config=TrainConfig(
            learning_rate=args.lr,
            max_steps=args.steps,
            batch_size=args.batch_size,
            eval_every=0,
            checkpoint_every=0,
            progress=False,
        ),
        existing="overwrite",
    )
    metrics = report["metrics"]
    print(
        json.dumps(
            {
                "method": args.method,
                "steps": report["steps"],
                "train_sentences": report["train_examples"],
                "dev_f1": round(metrics["f1"], 4),
                "dev_precision": round(metrics["precision"], 4),
                "dev_recall": round(metrics["recall"], 4),
                "per_type_f1": {k[3:]: round(v, 4) for k, v in metrics.items() if k[:3] == "f1_"},
                "all_O_baseline_f1": all_o_f1(args.data_dir),
                "trainable_parameters": report["trainable_parameters"],
                "artifact_bytes": report["artifact_bytes"],
                "train_time_s": report["train_time_s"],
                "torch_threads": report["torch_threads"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
