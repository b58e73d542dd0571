"""microtune's LoRA against the `peft` library's, with identical settings, side by side.

Both runs start from the same base model, the same initial A and B (ours are copied into peft's
layers) and the same head, see the same batches in the same order, and draw dropout masks from
the same random stream: each run keeps its own copy of the RNG state, and the two runs take
their steps in alternation, so step times are measured under the same machine load. Printed:
trainable parameters, dev accuracy, median step time, how far each merged model is from its
unmerged self, and how far the two implementations are from each other.

    python bench/peft_lora.py                    # 200 steps on 6,400 SST-2 examples
    python bench/peft_lora.py --max-steps 5      # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from microtune.backbone.load import load_backbone
from microtune.common.choices import DEFAULT_MODEL
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.data import batches, encode, epoch_order
from microtune.tasks.examples import load_split
from microtune.tasks.inference import predict
from microtune.tasks.spec import get_task
from microtune.tasks.types import loss_fn
from microtune.training.loop import evaluate
from microtune.training.steps import lr_schedule

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--train-examples", type=int, default=6400, help="0: all of SST-2")
    parser.add_argument("--dev-examples", type=int, default=0, help="0: the whole dev set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", default="", help="default: query,value")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or hub id")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args()


class Run:
    """One implementation's task model, optimizer and private RNG stream."""

    def __init__(self, name: str, model: TaskModel, args: argparse.Namespace, device: str):
        self.name = name
        self.model = model.to(device)
        self.device = device
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in parameters)
        self.optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
        warmup = int(args.warmup_ratio * args.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(warmup, args.max_steps)
        )
        self.cuda = device.startswith("cuda")
        with torch.random.fork_rng(devices=[device] if self.cuda else []):
            torch.manual_seed(args.seed)
            self.rng = self._get_rng()
        self.step_seconds: list[float] = []
        self.losses: list[float] = []

    @contextmanager
    def own_rng(self):
        """Swap this run's RNG state in for the step, so both runs see the same dropout masks."""
        outside = self._get_rng()
        self._set_rng(self.rng)
        try:
            yield
        finally:
            self.rng = self._get_rng()
            self._set_rng(outside)

    def _get_rng(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.cuda else None
        return torch.random.get_rng_state(), cuda

    def _set_rng(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.random.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)

    def step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        labels = labels.to(self.device)
        self.model.train()
        with self.own_rng():
            start = time.perf_counter()
            loss = loss_fn(self.model(**inputs), labels)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())


def build_runs(args: argparse.Namespace) -> tuple[Run, Run, object, list[str]]:
    options = {"rank": args.rank, "alpha": args.alpha, "lora_dropout": args.lora_dropout}
    if args.target_modules:
        options["target_modules"] = args.target_modules
    head = HeadConfig(num_labels=2, readout="mean")

    backbone, tokenizer = load_backbone(args.model)
    torch.manual_seed(args.seed)
    ours = TaskModel(backbone, head, build_method("lora", options))
    paths = ours.method.target_paths()

    reference_backbone, _ = load_backbone(args.model)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.lora_dropout, target_modules=paths
    )
    peft_backbone = get_peft_model(reference_backbone, config)
    theirs = TaskModel(peft_backbone, head)  # freezes everything, LoRA factors included
    with torch.no_grad():
        theirs.head.load_state_dict(ours.head.state_dict())
        for path, key in zip(paths, ours.method.factors, strict=True):
            layer = peft_backbone.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(ours.method.factors[key].A)
            layer.lora_B["default"].weight.copy_(ours.method.factors[key].B)
    lora_parameters = [p for n, p in theirs.backbone.named_parameters() if ".lora_" in n]
    assert len(lora_parameters) == 2 * len(paths), "peft targeted other layers than microtune"
    for parameter in lora_parameters:
        parameter.requires_grad_(True)
    return (
        Run("microtune", ours, args, args.device),
        Run("peft", theirs, args, args.device),
        tokenizer,
        paths,
    )


def merged_logits(run: Run, rows, pad_token_id: int) -> np.ndarray:
    """Fold LoRA into the weights (ours: TaskModel.merge; peft: merge_and_unload), then predict."""
    if run.name == "peft":
        run.model.backbone = run.model.backbone.merge_and_unload()
    else:
        run.model.merge()
    return predict(run.model, rows, pad_token_id)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task("sst2")
    train = load_split(task, "train", args.data_dir, limit=args.train_examples or None)
    dev = load_split(task, task.dev_split, args.data_dir, limit=args.dev_examples or None)
    ours, theirs, tokenizer, paths = build_runs(args)
    pad = tokenizer.pad_token_id
    train_rows = encode(tokenizer, train, args.max_length)
    dev_rows = encode(tokenizer, dev, args.max_length)
    train_labels = [e.label for e in train]
    dev_labels = [e.label for e in dev]

    start_gap = np.abs(predict(ours.model, dev_rows, pad) - predict(theirs.model, dev_rows, pad))
    steps, epoch = 0, 0
    while steps < args.max_steps:
        order = epoch_order(len(train_rows), args.seed, epoch)
        for inputs, labels in batches(train_rows, train_labels, args.batch_size, pad, order):
            for run in (ours, theirs) if steps % 2 == 0 else (theirs, ours):  # alternate who leads
                run.step(inputs, labels)
            steps += 1
            if steps == args.max_steps:
                break
        epoch += 1

    results = {}
    unmerged = {}
    for run in (ours, theirs):
        unmerged[run.name] = predict(run.model, dev_rows, pad)
        metrics = evaluate(run.model, task, dev_rows, dev_labels, pad)
        timed = run.step_seconds[1:] or run.step_seconds  # the first step warms up allocators
        results[run.name] = {
            "trainable_parameters": run.trainable,
            "dev_accuracy": metrics["accuracy"],
            "final_loss": run.losses[-1],
            "step_ms_median": 1000 * statistics.median(timed),
            "step_ms_mean": 1000 * statistics.fmean(timed),
        }
    merged = {}
    for run in (ours, theirs):
        merged[run.name] = merged_logits(run, dev_rows, pad)
        gap = np.abs(merged[run.name] - unmerged[run.name]).max()
        results[run.name]["max_abs_merged_minus_unmerged"] = float(gap)
    between = {
        "max_abs_logit_diff_at_start": float(start_gap.max()),
        "max_abs_logit_diff_unmerged": float(
            np.abs(unmerged["microtune"] - unmerged["peft"]).max()
        ),
        "max_abs_logit_diff_merged": float(np.abs(merged["microtune"] - merged["peft"]).max()),
        "max_abs_loss_diff": max(
            abs(a - b) for a, b in zip(ours.losses, theirs.losses, strict=True)
        ),
        "prediction_agreement": float(
            (unmerged["microtune"].argmax(1) == unmerged["peft"].argmax(1)).mean()
        ),
    }
    setup = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "task": "sst2",
        "steps": args.max_steps,
        "train_examples": len(train_rows),
        "dev_examples": len(dev_rows),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "alpha": args.alpha,
        "lora_dropout": args.lora_dropout,
        "targets": len(paths),
        "seed": args.seed,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }
    print_table(setup, results, between)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"setup": setup, "results": results, "between": between}, indent=2) + "\n"
        )


def print_table(setup: dict, results: dict, between: dict) -> None:
    print(" ".join(f"{k}={v}" for k, v in setup.items()))
    rows = [
        ("trainable parameters", "trainable_parameters", "{:d}"),
        ("dev accuracy", "dev_accuracy", "{:.4f}"),
        ("final train loss", "final_loss", "{:.4f}"),
        ("step time, median (ms)", "step_ms_median", "{:.1f}"),
        ("step time, mean (ms)", "step_ms_mean", "{:.1f}"),
        ("max |merged - unmerged| logit", "max_abs_merged_minus_unmerged", "{:.2e}"),
    ]
    print(f"{'':32}{'microtune':>14}{'peft':>14}")
    for label, key, fmt in rows:
        cells = "".join(f"{fmt.format(results[name][key]):>14}" for name in ("microtune", "peft"))
        print(f"{label:32}{cells}")
    print("between implementations:")
    for key, value in between.items():
        print(f"  {key:30}{value:.3e}" if key != "prediction_agreement" else f"  {key:30}{value}")


if __name__ == "__main__":
    main()
