"""What several commands share: the help formatter, the data options, reading --input."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from microtune.common.files import CONFIG_FILE
from microtune.errors import MicrotuneError

ARTIFACT_HELP = "artifact folder, or hub repo id owner/name[@revision] (fetched when online)"
MODEL_HELP = "base model, if not where the artifact says"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None / False of options that are unset unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:  # `in` would also hide 0
            return action.help or ""
        return super()._get_help_string(action)


def loading_message(artifact: str, model: str | None) -> str:
    """What `eval` and `predict` say while they start: the base model they load (`--model`,
    else the one the artifact's microtune.json names, read without the heavy stack and without
    checks: the loader refuses a bad artifact in its own words, after this line)."""
    name = model or recorded_base_model(artifact)
    if name is None:  # a hub id not fetched yet, or no artifact there
        return f"loading artifact {artifact} and its base model…"
    return f"loading base model {name}…"


def recorded_base_model(artifact: str) -> str | None:
    """The base model's name in a local artifact's microtune.json, or None."""
    try:
        config = json.loads((Path(artifact) / CONFIG_FILE).read_text(encoding="utf-8"))
        name = config["base_model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def add_data_options(parser: argparse.ArgumentParser, training: bool) -> None:
    """--data-dir, the own-file options, --text-columns, --label-column (and train's --labels)."""
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
    _add_column_options(group, training)


def _add_column_options(group, training: bool) -> None:
    group.add_argument(
        "--text-columns",
        type=comma_list,
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
            type=comma_list,
            help="comma-separated label names in a fixed order, for tasks that read their "
            "labels from the data (classification, token-classification, conll2003; default: "
            "the labels seen in training, sorted, O first for tags)",
        )


def add_folder_options(sub: argparse.ArgumentParser) -> None:
    """merge's and export's --artifact, --output, --overwrite and --model."""
    sub.add_argument("--artifact", required=True, help=ARTIFACT_HELP)
    sub.add_argument("--output", required=True, help="model folder to write")
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output (the whole folder) if it holds an earlier export; a folder "
        "with files microtune did not write, the base model's and the artifact's are always "
        "refused",
    )
    sub.add_argument("--model", help=MODEL_HELP)


def read_inputs(args: argparse.Namespace) -> list:
    """`--input`'s lines (or standard input's), parsed by `serving.parse_input_lines`."""
    from microtune.serving.tuned import parse_input_lines

    source = args.input or "standard input"
    try:
        if args.input:
            with open(args.input, encoding="utf-8") as handle:
                return parse_input_lines(handle)
        # Strict UTF-8 like --input, whatever the locale (its surrogate escapes reached the
        # tokenizer as a TypeError)
        buffer = getattr(sys.stdin, "buffer", None)  # None: already text (a test's StringIO)
        stdin = sys.stdin if buffer is None else io.TextIOWrapper(buffer, encoding="utf-8")
        return parse_input_lines(stdin)
    except OSError as error:
        raise MicrotuneError(f"cannot read --input {args.input}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise MicrotuneError(
            f"{source} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
