"""SLaSh in transformers' `Trainer` (through `microtune.peft`) beside `microtune train`, on SST-2.

Both train SLaSh (`d` numbers of z plus the 2-way head) on the packaged MiniLM with the pooler
read-out (what `AutoModelForSequenceClassification` feeds its classifier; `microtune train
--readout pooler`), the same first N training examples (N = steps x batch: one pass), steps,
batch, peak learning rate, linear warmup (microtune's 6 %) then linear decay, max length and
seed. Printed (JSON): both dev accuracies on SST-2's whole dev set; the bytes and files of one
Trainer checkpoint folder (the adapter, optimizer, scheduler and RNG states, no base weights);
resume identity (N steps straight vs resumed from the checkpoint at N/2: max |Δ| over the saved
adapter's tensors, 0 when bit-identical); merged parity (`merge_and_unload()`, a stock
`BertForSequenceClassification`, against the unmerged adapter on the dev set: max |Δlogit|).

    nice -n 10 python bench/peft_trainer.py --steps 100 --batch 32 --max-length 64 --threads 1

(about 6.5 min on 2 busy cores; its output: bench/results/peft_trainer.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from microtune import api
from microtune.backbone.load import resolve_model_path
from microtune.backbone.options import ModelOptions
from microtune.common.choices import DEFAULT_MODEL
from microtune.peft import SlashConfig
from microtune.tasks.spec import DataSource, get_task
from microtune.training.config import TrainConfig

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
WARMUP = TrainConfig.warmup_ratio  # microtune's default schedule, given to the Trainer too


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-2, help="SLaSh's default in microtune")
    parser.add_argument("--d", type=int, default=1024, help="SLaSh's z size (its default)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--output", help="folder for the runs (default: a temporary one)")
    return parser.parse_args()


def encoded(tokenizer, rows, max_length: int) -> list[dict]:
    return [
        {**tokenizer(row.texts[0], truncation=True, max_length=max_length), "labels": row.label}
        for row in rows
    ]


def trainer_for(model, tokenizer, rows, output: Path, args) -> Trainer:
    settings = TrainingArguments(
        str(output),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=int(WARMUP * args.steps),  # as microtune counts them
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=args.steps // 2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_steps=max(args.steps // 10, 1),
        seed=args.seed,
        data_seed=args.seed,
    )
    collator = DataCollatorWithPadding(tokenizer)
    return Trainer(model=model, args=settings, train_dataset=rows, data_collator=collator)


def slash_model(base: str, d: int, seed: int):
    torch.manual_seed(seed)  # the new classifier head: the same in every run
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    return get_peft_model(model, SlashConfig(task_type="SEQ_CLS", d=d))


@torch.no_grad()
def dev_logits(model, tokenizer, dev: list[dict]) -> np.ndarray:
    model.eval()
    collator, out = DataCollatorWithPadding(tokenizer), []
    unlabelled = [{k: v for k, v in row.items() if k != "labels"} for row in dev]
    for start in range(0, len(dev), 64):
        inputs = collator(unlabelled[start : start + 64])
        out.append(model(**inputs).logits.float().numpy())
    return np.concatenate(out)


def folder_bytes(folder: Path) -> tuple[int, dict[str, int]]:
    """(total bytes, bytes of each file) of a folder."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return sum(files.values()), dict(sorted(files.items()))


def run_trainer(base: str, tokenizer, train: list[dict], dev: list[dict], root: Path, args):
    """The straight run (with its checkpoint at N/2), the resume, and merged parity."""
    started = time.perf_counter()
    straight = slash_model(base, args.d, args.seed)
    trainer_for(straight, tokenizer, train, root / "straight", args).train()
    seconds = time.perf_counter() - started
    checkpoint = root / "straight" / f"checkpoint-{args.steps // 2}"
    resumed = slash_model(base, args.d, args.seed)
    trainer_for(resumed, tokenizer, train, root / "resumed", args).train(str(checkpoint))
    a, b = (get_peft_model_state_dict(m) for m in (straight, resumed))
    resume_diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    logits = dev_logits(straight, tokenizer, dev)
    straight.save_pretrained(str(root / "adapter"))
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), root / "adapter"
    )
    merged = reloaded.merge_and_unload()
    merged_logits = dev_logits(merged, tokenizer, dev)
    size, files = folder_bytes(checkpoint)
    labels = np.array([r["labels"] for r in dev])
    return {
        "trainer_dev_accuracy": float((logits.argmax(1) == labels).mean()),
        "trainer_train_seconds": round(seconds, 1),
        "checkpoint_folder_bytes": size,
        "checkpoint_files": files,
        "resume_max_abs_diff": resume_diff,
        "resume_bit_identical": resume_diff == 0.0,
        "merged_class": type(merged).__name__,
        "merged_max_abs_logit_diff": float(np.abs(merged_logits - logits).max()),
    }


def run_microtune(root: Path, args) -> dict:
    started = time.perf_counter()
    report = api.train(
        "sst2",
        "slash",
        root / "microtune",
        method_options={"d": args.d},
        model=ModelOptions(name=DEFAULT_MODEL, max_length=args.max_length, readout="pooler"),
        data=DataSource(data_dir=args.data_dir, max_train_examples=args.steps * args.batch),
        train_config=TrainConfig(
            max_steps=args.steps,
            batch_size=args.batch,
            learning_rate=args.lr,
            seed=args.seed,
            eval_every=0,
            progress=False,
        ),
    )
    return {
        "microtune_dev_accuracy": report["metrics"]["accuracy"],
        "microtune_train_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.output or tempfile.mkdtemp(prefix="peft-trainer-"))
    base = resolve_model_path(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(base)
    task = get_task("sst2")
    train_rows = api.load_split(task, "train", args.data_dir, limit=args.steps * args.batch)
    dev_rows = api.load_split(task, task.dev_split, args.data_dir)
    train = encoded(tokenizer, train_rows, args.max_length)
    dev = encoded(tokenizer, dev_rows, args.max_length)
    results = {"settings": vars(args) | {"warmup_ratio": WARMUP, "model": DEFAULT_MODEL}}
    results |= {"train_examples": len(train), "dev_examples": len(dev)}
    results |= run_trainer(base, tokenizer, train, dev, root, args)
    results |= run_microtune(root, args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
