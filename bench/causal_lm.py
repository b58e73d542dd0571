"""Causal-LM fine-tuning of SmolLM2-135M (`--task causal-lm`): dev perplexity and exact match
before and after SLaSh and LoRA, greedy tokens merged vs unmerged, and the step time.

The task (`--data sst2`, the default): SST-2 sentences as prompt/response pairs,
prompt "Review: <sentence>\\nSentiment:" and response " positive" / " negative" (exact match is
then the sentiment accuracy of free generation). `--data reverse`: a deterministic synthetic
task, a list of 3-5 common words and the same list reversed.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/causal_lm.py --steps 3 --train 32 --dev 16

prints one JSON object per method and a summary line. A smoke run of a few steps checks the
pipeline; the numbers worth quoting need a few hundred steps (`--steps 300 --train 4000`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from microtune import api, load
from microtune.backbone.load import load_backbone
from microtune.backbone.options import ModelOptions
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import rows_to_examples
from microtune.tasks.spec import DataSource, get_task
from microtune.tasks.types import get_task_type
from microtune.training.config import TrainConfig

DATA = Path(os.environ.get("MICROTUNE_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird"]


def sst2_rows(split: str, count: int) -> list[dict]:
    lines = (DATA / "glue" / "sst2" / f"{split}.jsonl").read_text().splitlines()[:count]
    rows = []
    for line in lines:
        row = json.loads(line)
        answer = " positive" if int(row["label"]) == 1 else " negative"
        rows.append({"prompt": f"Review: {row['sentence']}\nSentiment:", "response": answer})
    return rows


def reverse_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(3, 5))
        rows.append(
            {
                "prompt": f"Reverse: {' '.join(words)}\nReversed:",
                "response": " " + " ".join(reversed(words)),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def before_metrics(model: str, dev_rows: list[dict], max_length: int) -> dict:
    """Dev metrics of the base model itself (no method: SLaSh's z starts random, not at 0)."""
    causal = get_task_type("causal-lm")
    task = causal.fit_rows(get_task("causal-lm"), dev_rows, None)
    backbone, tokenizer = load_backbone(model, auto_class=causal.auto_class)
    task_model = TaskModel(backbone, HeadConfig(1, "tokens"), None, task_type=causal)
    examples = rows_to_examples(task, dev_rows, "dev")
    rows, labels = causal.encode(tokenizer, examples, max_length)
    return causal.evaluate(task_model, task, rows, labels, tokenizer.pad_token_id, 16, tokenizer)


def step_seconds(run_dir: Path) -> float:
    """Median seconds per optimizer step, from the per-step log (evaluation excluded)."""
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    times = [line["elapsed_s"] for line in lines if "elapsed_s" in line]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)] or times
    return statistics.median(gaps)


def greedy_check(run_dir: Path, dev_rows: list[dict], new_tokens: int) -> dict:
    """Greedy answers to the dev prompts unmerged, then merged in place: identical?"""
    tuned = load(run_dir)
    prompts = [r["prompt"] for r in dev_rows]
    unmerged = tuned.generate(prompts, new_tokens)
    tuned.merge()
    merged = tuned.generate(prompts, new_tokens)
    with tempfile.TemporaryDirectory() as folder:
        export = Path(folder) / "export"
        tuned.save_pretrained(export)
        from transformers import AutoModelForCausalLM

        stock = AutoModelForCausalLM.from_pretrained(export).eval()
        tokenizer = tuned.tokenizer
        ids = [tokenizer(p).input_ids for p in prompts[:4]]
        stock_ok = True
        for prompt, answer in zip(ids, unmerged[:4], strict=True):
            out = stock.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id)]
            stock_ok &= tokenizer.decode(out, skip_special_tokens=True) == answer["response"]
    return {
        "greedy_identical_merged": unmerged == merged,
        "greedy_identical_stock_export_first4": stock_ok,
        "examples": [
            {"prompt": u["prompt"][-40:], "response": u["response"]} for u in unmerged[:3]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", choices=("sst2", "reverse"), default="sst2")
    parser.add_argument("--methods", default="slash,lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train", type=int, default=32, help="training examples")
    parser.add_argument("--dev", type=int, default=16, help="dev examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.data == "sst2":
        train_rows, dev_rows = sst2_rows("train", args.train), sst2_rows("validation", args.dev)
    else:
        train_rows, dev_rows = reverse_rows(args.train, 1), reverse_rows(args.dev, 2)
    work = Path(tempfile.mkdtemp(prefix="causal-lm-bench-"))
    train_file = write_jsonl(work / "train.jsonl", train_rows)
    dev_file = write_jsonl(work / "dev.jsonl", dev_rows)
    results = []
    before = before_metrics(args.model, dev_rows, args.max_length)
    for method in args.methods.split(","):
        run_dir = work / method
        started = time.time()
        report = api.train(
            "causal-lm",
            method,
            run_dir,
            model=ModelOptions(name=args.model, max_length=args.max_length),
            data=DataSource(train_file=train_file, dev_file=dev_file),
            train_config=TrainConfig(
                learning_rate=args.lr,
                batch_size=args.batch_size,
                max_steps=args.steps,
                eval_every=0,
                checkpoint_every=0,
                log_every=1,
                progress=False,
            ),
        )
        result = {
            "method": method,
            "data": args.data,
            "steps": report["steps"],
            "train_examples": len(train_rows),
            "dev_examples": len(dev_rows),
            "before": before,
            "after": report["metrics"],
            "trainable_parameters": report["trainable_parameters"],
            "artifact_bytes": report["artifact_bytes"],
            "step_s": round(step_seconds(run_dir), 3),
            "batch_size": args.batch_size,
            "wall_s": round(time.time() - started, 1),
            "torch_threads": torch.get_num_threads(),
            **greedy_check(run_dir, dev_rows, new_tokens=8),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    print(
        "summary: "
        + "; ".join(
            f"{r['method']}: perplexity {r['before']['perplexity']:.2f} -> "
            f"{r['after']['perplexity']:.2f}, "
            f"EM {r['before']['exact_match']:.3f} -> {r['after']['exact_match']:.3f}, "
            f"{r['step_s']} s/step, greedy merged==unmerged {r['greedy_identical_merged']}"
            for r in results
        )
    )


if __name__ == "__main__":
    main()
