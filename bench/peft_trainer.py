"""SLaSh in transformers' `Trainer` (through `microtune.peft`) beside `microtune train`, on SST-2.

Both train SLaSh (`d` numbers of z plus the 2-way head) on the packaged MiniLM with the pooler
read-out (what `AutoModelForSequenceClassification` feeds its classifier; `microtune train
--readout pooler`), the same first N training examples (N = steps x batch: one pass), steps,
batch, peak learning rate, max length (64), seed and no weight decay, with the frozen blocks
in eval mode (SLaSh's `dropout=False`, which the peft tuner keeps too). `microtune train` runs
first, at its defaults; the Trainer then runs on the same protocol, each difference between
the two loops named and closed (`--undo NAME` opens one again):

- init: the Trainer starts from microtune's initial z and head. Otherwise each draws its own
  from the global RNG: z ~ N(0, 1/d) after a different number of draws, and the stock
  classifier is N(0, 0.02) where microtune's head has `nn.Linear`'s uniform init.
- order: the Trainer takes microtune's batches in microtune's order
  (`train_sampling_strategy="sequential"` over the rows in that order). Otherwise it draws
  its own random order, while microtune groups batches by length (unless
  `--no-group-by-length`).
- schedule: microtune's optimizer and warmup (torch's AdamW; step t of w warmup steps at
  lr (t+1)/w). transformers' warmup starts at 0, one step behind, and its default optimizer
  is the fused AdamW kernel.
- dropout: no dropout before the classifier (microtune's `--head-dropout 0`); the stock class
  has 0.1 there (`classifier_dropout`).
- clip: no gradient clipping, as microtune; the Trainer's `max_grad_norm` is 1.0 by default.

Printed (JSON): both dev accuracies on SST-2's whole dev set; how far the two runs are apart
(max |Δ| of the per-step training losses, and of the trained z and head); the bytes and files
of one Trainer checkpoint folder (the adapter, optimizer, scheduler and RNG states, no base
weights); resume identity (N steps straight vs resumed from the checkpoint at N/2: max |Δ|
over the saved adapter's tensors, 0 when bit-identical); merged parity (`merge_and_unload()`,
a stock `BertForSequenceClassification`, against the unmerged adapter on the dev set: max
|Δlogit|).

    python bench/peft_trainer.py --steps 100 --batch 32 --max-length 64 --threads 1

(about 3 min on 2 busy cores; its output: bench/results/peft_trainer.json). Measured there,
100 steps of 32: microtune 0.7557 and the Trainer 0.7557, bit-identical (every step's loss and
the trained z and head: max |Δ| 0); resume bit-identical; merged parity 1.3e-06. Each
difference alone (`--undo NAME`, the other four closed; microtune 0.7557 each time):

    --undo     Trainer   max |Δ| loss, trained
    init       0.7592    0.050, 0.29
    order      0.7317    0.40,  0.39
    schedule   0.7546    0.077, 0.13
    dropout    0.7511    0.036, 0.15
    clip       0.7546    0.022, 0.014
    all five   0.7351    0.36,  0.40   (the Trainer as it comes, as this bench ran before)

The 2.1 points between the Trainer as it comes and microtune were the batch order: at seed 0
the Trainer's own random order is exactly microtune's `--no-group-by-length` order (both
`torch.randperm` from a generator seeded 0), and `microtune train --task sst2 --method slash
--readout pooler --max-steps 100 --batch-size 32 --max-length 64 --max-train-examples 3200
--no-group-by-length` gives 0.7317, as `--undo order` does. The other four move the Trainer
by at most half a point either way: the spread of runs that draw differently, not a
difference in what trains.
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
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers import TrainerCallback as HFTrainerCallback

from microtune import api
from microtune.backbone.load import resolve_model_path
from microtune.backbone.options import ModelOptions
from microtune.common.choices import DEFAULT_MODEL
from microtune.peft import SlashConfig
from microtune.tasks.spec import DataSource, get_task
from microtune.training.callbacks import TrainerCallback
from microtune.training.config import TrainConfig
from microtune.training.steps import lr_schedule

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
WARMUP = TrainConfig.warmup_ratio  # microtune's default schedule, given to the Trainer too
ALIGNMENTS = ("init", "order", "schedule", "dropout", "clip")  # see the docstring


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
    parser.add_argument(
        "--undo",
        action="append",
        choices=ALIGNMENTS,
        default=[],
        help="let the Trainer keep its own way in this respect (repeatable; see the docstring)",
    )
    return parser.parse_args()


class MicrotuneRun(TrainerCallback):
    """What microtune's run starts from and does: the initial z and head, the rows of its
    batches in order, each step's loss, and the trained z and head."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_begin(self, trainer) -> None:
        self.start = tensors_of(trainer.model.method.z, trainer.model.head.linear)
        self.order = [i for batch in trainer.sampler.epoch(0) for i in batch]

    def on_step_end(self, trainer, logs) -> None:
        self.losses.append(logs["loss"])

    def on_train_end(self, trainer) -> None:
        self.trained = tensors_of(trainer.model.method.z, trainer.model.head.linear)


class StepLosses(HFTrainerCallback):
    """The Trainer's loss at every step (logging_steps=1)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def tensors_of(z: torch.Tensor, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    return {"z": z.detach().clone(), **{k: v.clone() for k, v in head.state_dict().items()}}


def encoded(tokenizer, rows, max_length: int) -> list[dict]:
    return [
        {**tokenizer(row.texts[0], truncation=True, max_length=max_length), "labels": row.label}
        for row in rows
    ]


def trainer_for(model, tokenizer, rows, output: Path, args) -> tuple[Trainer, StepLosses]:
    open_ = set(args.undo)
    settings = TrainingArguments(
        str(output),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=int(WARMUP * args.steps),  # as microtune counts them
        lr_scheduler_type="linear",
        max_grad_norm=1.0 if "clip" in open_ else 0.0,
        train_sampling_strategy="random" if "order" in open_ else "sequential",
        save_strategy="steps",
        save_steps=args.steps // 2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
        seed=args.seed,
        data_seed=args.seed,
    )
    optimizers = (None, None)  # the Trainer's own
    if "schedule" not in open_:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
        factor = lr_schedule(int(WARMUP * args.steps), args.steps)
        optimizers = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor))
    losses = StepLosses()
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model,
        args=settings,
        train_dataset=rows,
        data_collator=collator,
        optimizers=optimizers,
        callbacks=[losses],
    )
    trainer.remove_callback(PrinterCallback)  # stdout is the JSON report alone
    return trainer, losses


def slash_model(base: str, args, start: dict[str, torch.Tensor]):
    """The stock classifier model with SlashConfig; from microtune's z and head unless `init`
    is undone (then the head and z drawn after seeding, as a user's script would)."""
    torch.manual_seed(args.seed)
    head_dropout = {} if "dropout" in args.undo else {"classifier_dropout": 0.0}
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, **head_dropout)
    if "init" not in args.undo:
        model.classifier.load_state_dict({k: v for k, v in start.items() if k != "z"})
    model = get_peft_model(model, SlashConfig(task_type="SEQ_CLS", d=args.d))
    if "init" not in args.undo:
        with torch.no_grad():
            method_of(model).z.copy_(start["z"])
    return model


def method_of(model):
    return model.base_model.microtune_slash["default"]


def trained_tensors(model) -> dict[str, torch.Tensor]:
    head = model.base_model.model.classifier.modules_to_save["default"]
    return tensors_of(method_of(model).z, head)


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


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def run_trainer(base: str, tokenizer, train: list[dict], root: Path, args, run: MicrotuneRun):
    """The straight run (with its checkpoint at N/2) beside microtune's, and the resume."""
    rows = train if "order" in args.undo else [train[i] for i in run.order]
    started = time.perf_counter()
    straight = slash_model(base, args, run.start)
    trainer, losses = trainer_for(straight, tokenizer, rows, root / "straight", args)
    trainer.train()
    seconds = time.perf_counter() - started
    checkpoint = root / "straight" / f"checkpoint-{args.steps // 2}"
    resumed = slash_model(base, args, run.start)
    trainer_for(resumed, tokenizer, rows, root / "resumed", args)[0].train(str(checkpoint))
    a, b = (get_peft_model_state_dict(m) for m in (straight, resumed))
    resume_diff = max_diff(a, b)
    size, files = folder_bytes(checkpoint)
    return straight, {
        "trainer_train_seconds": round(seconds, 1),
        "loss_max_abs_diff": float(np.abs(np.subtract(losses.losses, run.losses)).max()),
        "trained_max_abs_diff": max_diff(trained_tensors(straight), run.trained),
        "checkpoint_folder_bytes": size,
        "checkpoint_files": files,
        "resume_max_abs_diff": resume_diff,
        "resume_bit_identical": resume_diff == 0.0,
    }


def merged_parity(straight, base: str, tokenizer, dev: list[dict], root: Path) -> dict:
    """Dev accuracy of the Trainer's model, and its merged stock model against it."""
    logits = dev_logits(straight, tokenizer, dev)
    straight.save_pretrained(str(root / "adapter"))
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), root / "adapter"
    )
    merged = reloaded.merge_and_unload()
    merged_logits = dev_logits(merged, tokenizer, dev)
    labels = np.array([r["labels"] for r in dev])
    return {
        "trainer_dev_accuracy": float((logits.argmax(1) == labels).mean()),
        "merged_class": type(merged).__name__,
        "merged_max_abs_logit_diff": float(np.abs(merged_logits - logits).max()),
    }


def run_microtune(root: Path, args) -> tuple[dict, MicrotuneRun]:
    started, run = time.perf_counter(), MicrotuneRun()
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
        plugins=[run],
    )
    return {
        "microtune_dev_accuracy": report["metrics"]["accuracy"],
        "microtune_train_seconds": round(time.perf_counter() - started, 1),
    }, run


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
    where = ("data_dir", "output")  # this machine's paths
    settings = {k: v for k, v in vars(args).items() if k not in where}
    settings |= {"warmup_ratio": WARMUP, "model": DEFAULT_MODEL}
    results = {"settings": settings, "train_examples": len(train), "dev_examples": len(dev)}
    microtune_results, run = run_microtune(root, args)
    straight, trainer_results = run_trainer(base, tokenizer, train, root, args, run)
    results |= merged_parity(straight, base, tokenizer, dev, root) | microtune_results
    results |= trainer_results
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
