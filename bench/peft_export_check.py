"""A LoRA artifact exported in peft's format and served by peft gives microtune's logits.

Trains LoRA briefly on SST-2 with the packaged MiniLM, exports it with `--format peft`
(`microtune.export.peft`), loads the folder with `PeftModel.from_pretrained` over the base
model, and compares the logits through the head with the unmerged artifact's on dev examples.
Printed: max |Δlogit| (peft vs microtune), the size of what LoRA changes (peft with the adapter
on vs off, so the first figure is not trivially small), and prediction agreement.

    python bench/peft_export_check.py                # 30 steps on 2,000 examples, 256 dev
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from microtune import api
from microtune.artifacts.store import load_artifact
from microtune.export.peft import export_peft_and_check
from microtune.tasks.data import batches, encode
from microtune.tasks.inference import predict
from microtune.tasks.spec import DataSource, get_task
from microtune.training.config import TrainConfig

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=256, help="dev examples compared")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--output", help="folder for the artifact and export (default: temp)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return parser.parse_args()


def peft_logits(folder: Path, rows, pad_token_id: int, adapter: bool) -> np.ndarray:
    """Logits of the peft-served export, with its LoRA on or switched off."""
    logits_fn, served = api.load_exported(folder)
    outputs = []
    with torch.no_grad():
        for inputs, _ in batches(rows, [0] * len(rows), 64, pad_token_id):
            if adapter:
                outputs.append(logits_fn(**inputs))
            else:
                with served.disable_adapter():
                    outputs.append(logits_fn(**inputs))
    return torch.cat(outputs).numpy()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.output or tempfile.mkdtemp(prefix="peft-export-"))
    report = api.train(
        "sst2",
        "lora",
        root / "artifact",
        data=DataSource(data_dir=args.data_dir, max_train_examples=args.train_examples),
        train_config=TrainConfig(max_steps=args.steps, eval_every=0, progress=False),
    )
    check = export_peft_and_check(
        root / "artifact", root / "peft", data_dir=args.data_dir, examples=args.examples
    )

    # The same comparison by hand, plus how far the adapter moves the logits at all.
    unmerged, tokenizer, config = load_artifact(root / "artifact")
    task = get_task("sst2")
    dev = api.load_split(task, task.dev_split, args.data_dir, limit=args.examples)
    rows = encode(tokenizer, dev, config["max_length"])
    ours = predict(unmerged, rows, tokenizer.pad_token_id)
    theirs = peft_logits(root / "peft", rows, tokenizer.pad_token_id, adapter=True)
    base = peft_logits(root / "peft", rows, tokenizer.pad_token_id, adapter=False)
    results = {
        "model": report["model"],
        "steps": report["steps"],
        "train_examples": report["train_examples"],
        "dev_accuracy_full_dev": report["metrics"]["accuracy"],
        "targets": check["targets"],
        "adapter_parameters": check["adapter_parameters"],
        "examples": len(rows),
        "max_abs_logit_diff_peft_vs_microtune": float(np.abs(theirs - ours).max()),
        "max_abs_logit_diff_export_check": check["max_abs_logit_diff"],
        "max_abs_logit_change_from_lora": float(np.abs(theirs - base).max()),
        "prediction_agreement": float((theirs.argmax(1) == ours.argmax(1)).mean()),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
