"""`microtune train`: one method on one task; writes the artifact and metrics.json."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.backbone.options import ModelOptions
from microtune.cli import options
from microtune.cli.common import HelpFormatter, add_data_options
from microtune.common.choices import DEFAULT_MODEL, DTYPE_NAMES, READOUTS
from microtune.errors import MicrotuneError
from microtune.methods import method_names
from microtune.tasks.spec import TASKS

DEFAULT_METHOD = "slash"


def add(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a method on a task; writes the artifact and metrics.json",
        formatter_class=HelpFormatter,
        description="Train one method on one task. Writes the artifact (adapter.safetensors + "
        "microtune.json), metrics.json and train_log.jsonl into --output.",
    )
    train.add_argument(
        "--task",
        required=True,
        choices=sorted(TASKS),
        help="task: sets the text columns, labels, loss and dev metric. GLUE names; conll2003 "
        "(NER, --data-dir); on your own --train-file/--dev-file: classification (labels read "
        "from the data), regression (a number), token-classification (JSONL tokens/ner_tags), "
        "causal-lm (JSONL prompt/response, loss on the response; or text)",
    )
    train.add_argument(
        "--method", default=DEFAULT_METHOD, choices=method_names(), help="fine-tuning method"
    )
    train.add_argument("--output", required=True, help="artifact folder to write")
    train.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="base model: hub id or local folder (the default is packaged)",
    )
    _add_run_options(train)
    _add_head_options(train)
    options.add_train_config_options(train)
    add_data_options(train, training=True)
    options.add_method_options(train)
    options.add_dp_options(train)


def _add_run_options(train: argparse.ArgumentParser) -> None:
    train.add_argument("--max-length", type=int, default=128, help="tokens per example")
    train.add_argument(
        "--resume", action="store_true", help="continue from --output's checkpoint if there is one"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output that holds another run's artifact or checkpoint, or "
        "files microtune did not write (those are kept, unless named like microtune's own)",
    )
    train.add_argument(
        "--device",
        default="auto",
        help="where to train: auto (the GPU if there is one), cpu, cuda, cuda:1",
    )
    train.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="precision of the frozen base model; what trains (and the head) stays float32",
    )


def _add_head_options(train: argparse.ArgumentParser) -> None:
    train.add_argument(
        "--readout",
        choices=READOUTS,
        default=None,
        help="sequence feature: mean (encoders' default), first ([CLS]/<s>), "
        "mask (a mask token appended to the first sentence), last (decoders' "
        "default), pooler (BERT's pooler); tokens (token classification's, set by itself)",
    )
    train.add_argument(
        "--head-dropout", type=float, default=0.0, help="dropout before the linear head"
    )
    train.add_argument(
        "--head-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a bias in the linear head (default: yes, except a decoder's last-token sentence "
        "head, which has none so that it exports as the stock ...ForSequenceClassification)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import train

    config = options.train_config(args)  # its refusals first, as before the package split
    model = ModelOptions(
        name=args.model,
        dtype=args.dtype,
        device=args.device,
        max_length=args.max_length,
        readout=args.readout,
        head_dropout=args.head_dropout,
        head_bias=args.head_bias,
    )
    if args.resume and args.overwrite:
        raise MicrotuneError(
            "--resume continues a run and --overwrite starts over; give only one of them"
        )
    return train(
        args.task,
        args.method,
        args.output,
        method_options=options.method_options(args),
        model=model,
        data=options.data_source(args),
        train_config=config,
        privacy=options.dp_config(args),
        existing="resume" if args.resume else "overwrite" if args.overwrite else "refuse",
    )
