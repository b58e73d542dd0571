"""The command line: train, eval, predict, generate, merge, export, info, inspect,
accountant, push and bench.

Thin by design: it parses, calls `microtune.api`, and prints. Method options are generated from
the methods' config dataclasses, so a new method's options appear here with their documentation
and no CLI change.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import sys
import typing
import warnings
from typing import Any

from safetensors import SafetensorError

from microtune import __version__
from microtune.errors import MicrotuneError
from microtune.heads import READOUTS
from microtune.methods import METHODS
from microtune.model import DEFAULT_MODEL, DTYPES
from microtune.privacy import ACCOUNTANTS, SAMPLINGS, DPConfig
from microtune.tasks import TASKS
from microtune.train import DEFAULT_MAX_STEPS, TrainConfig

DEFAULT_METHOD = "slash"
ARTIFACT_HELP = "artifact folder, or hub repo id owner/name[@revision] (fetched when online)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None / False of options that are unset unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:  # `in` would also hide 0
            return action.help or ""
        return super()._get_help_string(action)


def field_docs(cls: type) -> dict[str, str]:
    """Per-field help from a dataclass docstring's `Attributes:` section (Google style)."""
    docs: dict[str, str] = {}
    current = None
    in_attributes = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes or not stripped:
            continue
        match = re.match(r"^(\w+): (.*)$", stripped)
        if match and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = match.group(1)
            docs[current] = match.group(2)
        elif current:
            docs[current] += " " + stripped
    return docs


def _method_option_specs() -> dict[str, dict[str, Any]]:
    """Every method-config field across methods: its type, help text and owning methods."""
    specs: dict[str, dict[str, Any]] = {}
    for name, method in sorted(METHODS.items()):
        config_cls = method.config_class
        hints = typing.get_type_hints(config_cls)
        # A subclass documents its own fields; inherited ones keep their base's text.
        docs: dict[str, str] = {}
        for klass in reversed(config_cls.__mro__):
            docs.update(field_docs(klass))
        for field in dataclasses.fields(config_cls):
            spec = specs.setdefault(
                field.name,
                {
                    "type": hints[field.name],
                    "methods": [],
                    "help": docs.get(field.name, ""),
                    "defaults": {},
                },
            )
            # One flag serves every method with this field, so the meaning must agree.
            assert spec["type"] == hints[field.name], f"{field.name}: types differ across methods"
            spec["methods"].append(name)
            spec["defaults"][name] = field.default
    return specs


def _scalar_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "method options", "apply to the methods named in brackets; defaults per method"
    )
    for field, spec in _method_option_specs().items():
        hint = _scalar_type(spec["type"])
        defaults = ", ".join(f"{m}={d}" for m, d in spec["defaults"].items())
        text = f"{spec['help']} [{', '.join(spec['methods'])}; default {defaults}]"
        flag = "--" + field.replace("_", "-")
        if hint is bool:
            group.add_argument(
                flag,
                dest=f"method_{field}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            group.add_argument(
                flag,
                dest=f"method_{field}",
                type=hint,
                default=None,
                help=text,
                metavar=field.upper(),
            )


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the user set, checked against the chosen method."""
    config_cls = METHODS[args.method].config_class
    allowed = {f.name for f in dataclasses.fields(config_cls)}
    chosen = {
        key[len("method_") :]: value
        for key, value in vars(args).items()
        if key.startswith("method_") and value is not None
    }
    wrong = sorted(set(chosen) - allowed)
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise MicrotuneError(f"{flags} does not apply to method '{args.method}'")
    return chosen


_DP_CHOICES = {"sampling": SAMPLINGS, "accountant": ACCOUNTANTS}


def _add_dp_options(parser: argparse.ArgumentParser) -> None:
    """--dp-<field> for every DPConfig field, documented from its docstring."""
    group = parser.add_argument_group(
        "differential privacy (DP-SGD)", "private training is on when --dp-epsilon or --dp-sigma"
    )
    docs = field_docs(DPConfig)
    hints = typing.get_type_hints(DPConfig)
    for field in dataclasses.fields(DPConfig):
        default = "" if field.default is None else f" (default {field.default})"
        group.add_argument(
            "--dp-" + field.name.replace("_", "-"),
            dest=f"dp_{field.name}",
            type=_scalar_type(hints[field.name]),
            choices=_DP_CHOICES.get(field.name),
            default=None,
            help=docs[field.name] + default,
            metavar=None if field.name in _DP_CHOICES else field.name.upper(),
        )


def _dp_config(args: argparse.Namespace) -> DPConfig | None:
    chosen = {
        f.name: getattr(args, f"dp_{f.name}")
        for f in dataclasses.fields(DPConfig)
        if getattr(args, f"dp_{f.name}") is not None
    }
    if not chosen:
        return None
    if "epsilon" not in chosen and "sigma" not in chosen:
        raise MicrotuneError("the --dp-* options need --dp-epsilon E (or a fixed --dp-sigma S)")
    return DPConfig(**chosen)


def _add_accountant_command(commands) -> None:
    text = (
        "privacy accounting: the noise multiplier sigma for a target epsilon, or the epsilon of "
        "a sigma; prints one JSON object"
    )
    sub = commands.add_parser("accountant", help=text, description=text)
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon: prints the sigma it needs")
    target.add_argument("--sigma", type=float, help="noise multiplier: prints the epsilon spent")
    sub.add_argument("--delta", type=float, help="delta (default 1/(2N) with --num-examples N)")
    sub.add_argument("--num-examples", type=int, help="training set size N, for the default delta")
    sub.add_argument(
        "--sample-rate", type=float, required=True, help="sampling rate q = logical batch / N"
    )
    length = sub.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="number of noisy steps")
    length.add_argument(
        "--epochs", type=float, help="epochs, at floor(1/q) steps each (as the trainer counts)"
    )
    sub.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="accountant")


def _accountant(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.privacy import calibrate_sigma, epsilon_spent

    delta = args.delta
    if delta is None:
        if args.num_examples is None or args.num_examples < 1:
            raise MicrotuneError("give --delta D, or --num-examples N for the default 1/(2N)")
        delta = 1 / (2 * args.num_examples)
    q = args.sample_rate
    if not (q is not None and 0 < q <= 1):
        raise MicrotuneError(f"--sample-rate must be in (0, 1], got {q}")
    steps = args.steps
    if steps is None:
        if not args.epochs > 0:
            raise MicrotuneError(f"--epochs must be positive, got {args.epochs}")
        steps = math.ceil(args.epochs * max(1, math.floor(1 / q)))
    result = {"delta": delta, "sample_rate": q, "steps": steps, "accountant": args.accountant}
    if args.epsilon is not None:
        sigma = calibrate_sigma(args.epsilon, delta, q, steps, args.accountant)
        return {"sigma": sigma, "epsilon": args.epsilon, **result}
    epsilon = epsilon_spent(args.sigma, q, steps, delta, args.accountant)
    return {"epsilon": epsilon, "sigma": args.sigma, **result}


def _add_bench_command(commands) -> None:
    text = "methods x tasks x seeds from a bench file (bench/configs/*.toml): run, tune, report"
    bench = commands.add_parser("bench", help=text, description=text)
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("run", "run every unfinished cell; one JSON record per cell in --output/cells"),
        ("tune", "choose each method's learning rate on a slice of the training set"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", nargs="?", help="bench file (TOML)")
        sub.add_argument(
            "--output", help=f"bench folder (default: runs/{name.replace('run', 'bench')}-<name>)"
        )
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
        sub.add_argument("--jobs", type=int, default=1, help="cells at once")
        sub.add_argument("--model", help="base model instead of the bench file's")
        sub.add_argument("--data-dir", help="data folder instead of the bench file's")
        if name == "run":
            sub.add_argument(
                "--quick", action="store_true", help="the quick preset (bench/configs/quick.toml)"
            )
    report = actions.add_parser("report", help="write report.md and PNG plots of a bench folder")
    report.add_argument("folder", help="bench folder (a `bench run` --output)")


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.bench.config import load_config, quick_config_path

    if args.bench_command == "report":
        from microtune.bench.report import report

        return report(args.folder)
    config_path = args.config
    if getattr(args, "quick", False):
        if config_path:
            raise MicrotuneError("give a bench file or --quick, not both")
        config_path = quick_config_path()
    if not config_path:
        raise MicrotuneError("name a bench file, e.g. bench/configs/full.toml (or --quick)")
    overrides = {
        k: v for k, v in (("model", args.model), ("data_dir", args.data_dir)) if v is not None
    }
    output = args.output
    if args.bench_command == "tune":
        from microtune.bench.tune import tune

        name = load_config(config_path, overrides, tuned=False).name
        output = output or f"runs/tune-{name}"
        return tune(config_path, output, device=args.device, jobs=args.jobs, overrides=overrides)
    from microtune.bench.runner import run_bench

    config = load_config(config_path, overrides)
    return run_bench(
        config, output or f"runs/bench-{config.name}", device=args.device, jobs=args.jobs
    )


def _add_data_options(parser: argparse.ArgumentParser, training: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-dir",
        help="folder laid out like ../shared/data "
        "(glue/<task>/<split>.jsonl); without it, data comes from the hub",
    )
    if training:
        group.add_argument("--train-file", help="your own CSV/TSV/JSON/JSONL training file")
        group.add_argument("--dev-file", help="your own dev file (same format)")
        group.add_argument(
            "--max-train-examples",
            type=int,
            help="use only the first N training examples (quick runs)",
        )
    else:
        group.add_argument(
            "--data-file",
            "--dev-file",  # the name train used for the same file
            dest="data_file",
            help="your own CSV/TSV/JSON/JSONL file to evaluate (alias: --dev-file)",
        )
    group.add_argument(
        "--text-columns",
        type=lambda s: tuple(s.split(",")),
        help="comma-separated text column(s) in your files "
        "(default: the task's, e.g. sentence1,sentence2)",
    )
    group.add_argument(
        "--label-column",
        default=None,
        help="label column (default: the task's: label, or ner_tags for token classification"
        + ("" if training else "; for eval, the column the artifact was trained with")
        + ")",
    )
    if training:
        group.add_argument(
            "--labels",
            type=lambda s: tuple(s.split(",")),
            help="comma-separated label names in a fixed order, for tasks that read their "
            "labels from the data (classification, token-classification, conll2003; default: "
            "the labels seen in training, sorted, O first for tags)",
        )


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line, exit 2, instead of the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"microtune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="microtune",
        description="Fine-tune a pretrained transformer with a few thousand parameters per task, "
        "then merge it away: zero added inference latency.",
    )
    parser.add_argument("--version", action="version", version=f"microtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a method on a task; writes the artifact and metrics.json",
        formatter_class=_HelpFormatter,
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
        "--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="fine-tuning method"
    )
    train.add_argument("--output", required=True, help="artifact folder to write")
    train.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="base model: hub id or local folder (the default is packaged)",
    )
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help=f"optimizer steps (default {DEFAULT_MAX_STEPS} unless --epochs)",
    )
    length.add_argument("--epochs", type=float, default=None, help="passes over the data")
    train.add_argument("--seed", type=int, default=0, help="data order, init and dropout seed")
    train.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: the method's, e.g. slash 2e-2)",
    )
    train.add_argument("--batch-size", type=int, default=32, help="examples per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.06,
        help="fraction of steps with linear warmup, then linear decay",
    )
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--max-length", type=int, default=128, help="tokens per example")
    train.add_argument(
        "--eval-every",
        type=int,
        default=250,
        help="dev evaluation every N steps (0: only at the end)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="atomic checkpoint every N steps (0: never)",
    )
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
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="uniformly shuffled batches instead of batches of similar length (more padding)",
    )
    train.add_argument(
        "--device",
        default="auto",
        help="where to train: auto (the GPU if there is one), cpu, cuda, cuda:1",
    )
    train.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="precision of the frozen base model; what trains (and the head) stays float32",
    )
    _add_data_options(train, training=True)
    _add_method_options(train)
    _add_dp_options(train)

    evaluate = commands.add_parser("eval", help="evaluate an artifact; prints one JSON object")
    evaluate.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    evaluate.add_argument("--task", choices=sorted(TASKS), help="task (default: the artifact's)")
    evaluate.add_argument("--split", help="split name (default: the task's dev split)")
    evaluate.add_argument("--model", help="base model, if not where the artifact says")
    _add_data_options(evaluate, training=False)

    for name, text in (
        ("merge", "fold an artifact into the base weights and write a standard model folder"),
        (
            "export",
            "merge, write the model folder, and check it loads and matches with plain transformers",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
        sub.add_argument("--output", required=True, help="model folder to write")
        sub.add_argument(
            "--overwrite",
            action="store_true",
            help="replace --output (the whole folder) if it is not empty; the base model's and "
            "the artifact's folders are always refused",
        )
        sub.add_argument("--model", help="base model, if not where the artifact says")
        if name == "export":
            sub.add_argument("--data-dir", help="folder of the task's data, for the check")
            sub.add_argument(
                "--data-file",
                help="your own dev file, for the check of a task trained on your own files "
                "(merged format)",
            )
            sub.add_argument(
                "--check-examples",
                type=int,
                default=256,
                help="dev examples to compare merged and unmerged outputs on",
            )
            sub.add_argument(
                "--format",
                choices=("merged", "peft"),
                default="merged",
                help="merged: the method folded into the base weights, a standard model "
                "folder; peft (LoRA only): peft's adapter_config.json + "
                "adapter_model.safetensors with the head beside it, checked by loading it with "
                "PeftModel.from_pretrained",
            )

    predict = commands.add_parser(
        "predict",
        help="label texts with an artifact; prints one JSON line per input",
        description="Label inputs with an artifact (unmerged): one JSON line "
        '{"label": ..., "score": ...} per input, in order. Inputs are lines of text, or JSON '
        "objects with the task's text columns (needed for pair tasks), from --input or stdin.",
    )
    predict.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    predict.add_argument("--input", help="file of inputs, one per line (default: stdin)")
    predict.add_argument("--model", help="base model, if not where the artifact says")
    predict.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")

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
    generate.add_argument("--model", help="base model, if not where the artifact says")
    generate.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")

    _add_accountant_command(commands)
    _add_bench_command(commands)

    info = commands.add_parser("info", help="describe an artifact, or list what is supported")
    info.add_argument("--artifact", help=ARTIFACT_HELP + " to describe")

    push = commands.add_parser(
        "push",
        help="upload an artifact to a Hugging Face hub repo, with a model card",
        description="Check that an artifact folder is complete, create the hub model repo if "
        "needed, and upload microtune.json, adapter.safetensors, metrics.json (if present) and "
        'a generated README.md in one commit. Then `microtune.load("owner/name")` and every '
        "--artifact option take the repo id. Needs a network.",
    )
    push.add_argument("--artifact", required=True, help="artifact folder to upload")
    push.add_argument("--repo", required=True, help="hub model repo id: owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push.add_argument(
        "--token", help="hub token (default: the HF_TOKEN variable or `hf auth login`)"
    )

    inspect = commands.add_parser(
        "inspect",
        help="print the architecture map microtune would use for a model",
        description="Print the architecture map for a model: declared (microtune/arch.py) or "
        "discovered from its structure, the number of blocks, hidden size D, FFN size F and "
        "every path.",
    )
    inspect.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub id or local model folder (default packaged)"
    )
    return parser


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import train

    max_steps = args.max_steps
    if max_steps is None and args.epochs is None:
        max_steps = DEFAULT_MAX_STEPS
    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=max_steps,
        epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        progress=not args.no_progress,
        group_by_length=not args.no_group_by_length,
    )
    return train(
        args.task,
        args.method,
        args.output,
        model=args.model,
        method_options=_method_options(args),
        readout=args.readout,
        head_dropout=args.head_dropout,
        head_bias=args.head_bias,
        train_config=config,
        data_dir=args.data_dir,
        train_file=args.train_file,
        dev_file=args.dev_file,
        text_columns=args.text_columns,
        label_column=args.label_column,
        labels=args.labels,
        max_length=args.max_length,
        max_train_examples=args.max_train_examples,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        privacy=_dp_config(args),
        dtype=args.dtype,
    )


def _info(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.api import artifact_summary
    from microtune.arch import ARCHITECTURES

    if args.artifact:
        return artifact_summary(args.artifact)
    return {
        "version": __version__,
        "default_model": DEFAULT_MODEL,
        "methods": {
            name: {"mergeable": m.mergeable, "default_lr": m.default_learning_rate}
            for name, m in sorted(METHODS.items())
        },
        "tasks": {
            name: {"type": t.type, "num_labels": t.num_labels, "metrics": list(t.metrics)}
            for name, t in TASKS.items()
        },
        "architectures": sorted(ARCHITECTURES),
        "readouts": list(READOUTS),
    }


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.arch import describe
    from microtune.model import load_backbone

    backbone, _ = load_backbone(args.model)
    return describe(backbone)


def _read_inputs(args: argparse.Namespace) -> list:
    """`--input`'s lines (or standard input's), parsed by `serving.parse_input_lines`."""
    from microtune.serving import parse_input_lines

    source = args.input or "standard input"
    try:
        if args.input:
            with open(args.input, encoding="utf-8") as handle:
                return parse_input_lines(handle)
        return parse_input_lines(sys.stdin)
    except OSError as error:
        raise MicrotuneError(f"cannot read --input {args.input}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise MicrotuneError(
            f"{source} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None


def _predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    from microtune.serving import load

    if args.batch_size < 1:
        raise MicrotuneError(f"--batch-size must be at least 1, got {args.batch_size}")
    return load(args.artifact, args.model).predict(_read_inputs(args), args.batch_size)


def _generate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from microtune.serving import load

    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompt is None:
        for number, line in enumerate(_read_inputs(args), 1):
            if isinstance(line, dict):
                line = line.get("prompt", line.get("text"))
            if not isinstance(line, str):
                raise MicrotuneError(f"prompt {number}: a JSON line needs a 'prompt' text")
            prompts.append(line)
    return load(args.artifact, args.model).generate(prompts, args.max_new_tokens, args.batch_size)


def run(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    from microtune import api

    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return api.evaluate_artifact(
            args.artifact,
            task=args.task,
            split=args.split,
            model=args.model,
            data_dir=args.data_dir,
            data_file=args.data_file,
            text_columns=args.text_columns,
            label_column=args.label_column,
        )
    if args.command == "merge":
        return api.merge_artifact(args.artifact, args.output, args.model, overwrite=args.overwrite)
    if args.command == "export":
        export = api.export_and_check
        if args.format == "peft":
            from microtune.peft_format import export_peft_and_check as export
        if args.data_file and args.format == "peft":
            raise MicrotuneError("--data-file applies to --format merged")
        own_file = {"data_file": args.data_file} if args.data_file else {}
        return export(
            args.artifact,
            args.output,
            model=args.model,
            data_dir=args.data_dir,
            examples=args.check_examples,
            overwrite=args.overwrite,
            **own_file,
        )
    if args.command == "predict":
        return _predict(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "accountant":
        return _accountant(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "push":
        from microtune.hub import push_artifact

        return push_artifact(
            args.artifact,
            args.repo,
            private=args.private,
            revision=args.revision,
            token=args.token,
        )
    return _info(args)


def one_line(text: str) -> str:
    """The first non-empty line of a message (library errors are often multi-line reports)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def os_error_message(error: OSError) -> str:
    """An OSError as one line that names the file and the cause (disk full, permission...)."""
    where = error.filename or ""
    cause = error.strerror or one_line(str(error)) or type(error).__name__
    fixes = {
        errno.ENOSPC: "free some disk space and run again",
        errno.EACCES: "check the folder's permissions or choose another --output",
        errno.EROFS: "choose a writable --output",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a parent of this path is a file; choose another path",
        errno.EISDIR: "this path is a folder; name a file",
    }
    fix = fixes.get(error.errno, "check the path and run again")
    return f"{where}: {cause}; {fix}" if where else f"{cause}; {fix}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"microtune: warning: {one_line(str(message))}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors exit 2 with one line, Ctrl-C exits 130, nothing prints a
    traceback unless MICROTUNE_DEBUG=1 (an unexpected one exits 1 and asks for a report)."""
    debug = os.environ.get("MICROTUNE_DEBUG", "") not in ("", "0")
    if not debug:
        warnings.formatwarning = _one_line_warning  # a warning is one line too
    try:
        result = run(argv)
    except MicrotuneError as error:
        print(f"microtune: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "microtune: interrupted; `train --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    except OSError as error:  # disk full, read-only folder, vanished file: the user can fix it
        if debug:
            raise
        print(f"microtune: error: {os_error_message(error)}", file=sys.stderr)
        return 2
    except SafetensorError as error:  # its I/O errors (a full disk) are not OSErrors
        if debug:
            raise
        print(
            f"microtune: error: reading or writing a safetensors file failed: "
            f"{one_line(str(error))}; free disk space or restore the file, then run again",
            file=sys.stderr,
        )
        return 2
    except Exception as error:  # a bug of ours: one line, and how to see the rest
        if debug:
            raise
        print(
            f"microtune: internal error: {type(error).__name__}: {one_line(str(error))} "
            "(please report it; MICROTUNE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    if isinstance(result, list):  # `predict`, `generate`: one JSON line per input
        for record in result:
            print(json.dumps(record))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
