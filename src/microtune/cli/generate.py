"""`microtune generate`: greedy continuations with a causal-lm artifact; one JSON line each."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli.common import ARTIFACT_HELP, MODEL_HELP, read_inputs
from microtune.errors import MicrotuneError


def add(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="continue prompts with a causal-lm artifact; prints one JSON line per prompt",
        description="Greedy generation with a causal-lm artifact (unmerged; a merged export "
        'gives the same tokens): one JSON line {"prompt": ..., "response": ...} per prompt, in '
        "order. Prompts from --prompt, or --input (JSONL with a 'prompt' or 'text' field, or "
        "one prompt per line), or stdin.",
    )
    generate.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    prompt = generate.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--input", help="file of prompts (default: stdin)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response")
    generate.add_argument("--model", help=MODEL_HELP)
    generate.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = []
    for number, line in enumerate(read_inputs(args), 1):
        if isinstance(line, dict):
            line = line.get("prompt", line.get("text"))
        if not isinstance(line, str):
            raise MicrotuneError(f"prompt {number}: a JSON line needs a 'prompt' text")
        prompts.append(line)
    return prompts


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from microtune.serving.tuned import load

    prompts = _prompts(args)
    return load(args.artifact, args.model).generate(prompts, args.max_new_tokens, args.batch_size)
