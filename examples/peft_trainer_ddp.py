"""SLaSh through peft in transformers' `Trainer`, data-parallel on CPUs (gloo).

    torchrun --nproc-per-node 2 examples/peft_trainer_ddp.py --model MODEL --output OUT

`get_peft_model(..., SlashConfig(...))` on an `AutoModelForSequenceClassification`; the Trainer
wraps it in DistributedDataParallel (gloo on CPUs), so every rank trains on its share of each
batch and all-reduces the gradients of z and the head. Rank 0 saves the adapter
(`save_pretrained`) and the logits of a fixed probe batch; every rank writes `rank-<r>.json`
(world size, backend, steps, the SHA-256 of its trained tensors: equal on every rank when the
gradients were all-reduced). tests/test_peft_trainer_ddp.py runs it on a tiny random BERT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from microtune.peft import SlashConfig  # importing microtune.peft registers the methods

WORDS = "the a film movie is was good bad great awful not very fun dull plot story love hate"
POSITIVE = {"good", "great", "fun", "love"}
PROBE = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]


def rows(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Five-word sentences; positive when one of the positive words is in them."""
    rng, words = random.Random(seed), WORDS.split()
    out = []
    for _ in range(count):
        sample = rng.sample(words, 5)
        out.append({**tokenizer(" ".join(sample)), "labels": int(bool(POSITIVE & set(sample)))})
    return out


def trained_digest(model) -> str:
    """SHA-256 of the trainable tensors, in name order (equal across ranks after all-reduce)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode() + parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model name or folder")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--d", type=int, default=16, help="SLaSh's z size")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)  # the new classifier head: the same on every rank
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = get_peft_model(model, SlashConfig(task_type="SEQ_CLS", d=args.d))
    training = TrainingArguments(
        str(args.output / "run"),
        max_steps=args.steps,
        per_device_train_batch_size=4,  # 8 a step over two ranks
        learning_rate=2e-2,
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=rows(tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    result = trainer.train()
    record_rank(args.output, model, result.global_step)
    if trainer.is_world_process_zero():
        model.save_pretrained(str(args.output / "adapter"))
        model.eval()
        with torch.no_grad():
            probe = tokenizer(PROBE, padding=True, return_tensors="pt")
            torch.save(model(**probe).logits, args.output / "logits.pt")


def record_rank(output: Path, model, steps: int) -> None:
    """rank-<r>.json: what this process ran."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
        "steps": steps,
        "trained_sha256": trained_digest(model),
    }
    (output / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
