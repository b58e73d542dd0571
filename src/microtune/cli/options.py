"""argparse options generated from config dataclasses, in the style of peft's configs: each field
documents itself with `field(metadata={"help": ...})`, and its flag, type, default and help come
from the field. The metadata keys read here:

- "help": what the field means (every field with a flag has one);
- "flag": the flag, when it is not `--` + the field's name with dashes; a `--no-...` flag on a
  boolean that defaults to true switches it off;
- "cli_help": the command line's wording, where the field's own would mislead (a negating flag,
  a default the command line sets);
- "choices": the values allowed;
- "cli": False for a field with no flag.

Three users: `TrainConfig` (the train command's optimisation options), `DPConfig` (its `--dp-*`
options) and the method configs (one flag per field name across methods, `--method` picks).
Only torch-free modules are imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from microtune.errors import MicrotuneError
from microtune.methods import method_config, method_names
from microtune.privacy.config import DPConfig
from microtune.tasks.spec import DataSource
from microtune.training.config import DEFAULT_MAX_STEPS, TrainConfig

# Members of one group take one flag at most (the library lets max_steps win over epochs; the
# command line refuses both).
TRAIN_EXCLUSIVE = (("max_steps", "epochs"),)


def scalar_type(hint: Any) -> type:
    """`int` for `int | None`: the type argparse converts to."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def flag_of(name: str, prefix: str = "--") -> str:
    return prefix + name.replace("_", "-")


def dest_of(flag: str) -> str:
    """The attribute argparse stores a flag under."""
    return flag.removeprefix("--").replace("-", "_")


def field_argument(hint: Any, text: str, *, default: Any = None, **extra: Any) -> dict[str, Any]:
    """`add_argument`'s keywords for a field of type `hint`: a boolean takes --x / --no-x."""
    if scalar_type(hint) is bool:
        return {"action": argparse.BooleanOptionalAction, "default": default, "help": text}
    if extra.get("choices"):
        extra["metavar"] = None
    return {"type": scalar_type(hint), "default": default, "help": text, **extra}


def flagged_fields(cls: type, prefix: str = "--") -> list[tuple[dataclasses.Field, Any, str]]:
    """(field, type, flag) of every field of `cls` that has a flag."""
    hints = typing.get_type_hints(cls)
    return [
        (field, hints[field.name], field.metadata.get("flag", flag_of(field.name, prefix)))
        for field in dataclasses.fields(cls)
        if field.metadata.get("cli", True)
    ]


def _negating(field: dataclasses.Field, flag: str) -> bool:
    return flag.startswith("--no-") and field.default is True


# -- TrainConfig: the train command's optimisation options ---------------------------------------


def add_train_config_options(parser: argparse.ArgumentParser) -> None:
    """A flag per `TrainConfig` field (but those marked "cli": False), defaults shown."""
    group = parser.add_argument_group("optimisation")
    exclusive: dict[tuple[str, ...], Any] = {}
    for field, hint, flag in flagged_fields(TrainConfig):
        text = field.metadata.get("cli_help", field.metadata["help"])
        if _negating(field, flag):
            group.add_argument(flag, action="store_true", help=text)
            continue
        target = group
        for members in TRAIN_EXCLUSIVE:
            if field.name in members:
                if members not in exclusive:
                    exclusive[members] = group.add_mutually_exclusive_group()
                target = exclusive[members]
        choices = field.metadata.get("choices")
        target.add_argument(
            flag, **field_argument(hint, text, default=field.default, choices=choices)
        )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed options; DEFAULT_MAX_STEPS unless --max-steps or --epochs."""
    values = {}
    for field, _, flag in flagged_fields(TrainConfig):
        value = getattr(args, dest_of(flag))
        values[field.name] = not value if _negating(field, flag) else value
    if values["max_steps"] is None and values["epochs"] is None:
        values["max_steps"] = DEFAULT_MAX_STEPS
    return TrainConfig(**values)


# -- DPConfig: --dp-<field> -----------------------------------------------------------------------


def add_dp_options(parser: argparse.ArgumentParser) -> None:
    """--dp-<field> for every `DPConfig` field; unset (None) unless given."""
    group = parser.add_argument_group(
        "differential privacy (DP-SGD)", "private training is on when --dp-epsilon or --dp-sigma"
    )
    for field, hint, flag in flagged_fields(DPConfig, prefix="--dp-"):
        default = "" if field.default is None else f" (default {field.default})"
        text = field.metadata["help"] + default
        choices = field.metadata.get("choices")
        group.add_argument(
            flag, **field_argument(hint, text, choices=choices, metavar=field.name.upper())
        )


def dp_config(args: argparse.Namespace) -> DPConfig | None:
    """The `DPConfig` of the --dp-* options given, or None when none is."""
    chosen = {
        field.name: getattr(args, dest_of(flag))
        for field, _, flag in flagged_fields(DPConfig, prefix="--dp-")
        if getattr(args, dest_of(flag)) is not None
    }
    if not chosen:
        return None
    if "epsilon" not in chosen and "sigma" not in chosen:
        raise MicrotuneError("the --dp-* options need --dp-epsilon E (or a fixed --dp-sigma S)")
    return DPConfig(**chosen)


# -- the method configs: one flag per field name, across methods ---------------------------------


def method_option_specs() -> dict[str, dict[str, Any]]:
    """Every method-config field across methods: its type, help text and owning methods."""
    specs: dict[str, dict[str, Any]] = {}
    for name in method_names():
        config_cls = method_config(name)
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            spec = specs.setdefault(
                field.name,
                {
                    "type": hints[field.name],
                    "methods": [],
                    "help": field.metadata.get("help", ""),
                    "defaults": {},
                },
            )
            # One flag serves every method with this field, so the meaning must agree.
            assert spec["type"] == hints[field.name], f"{field.name}: types differ across methods"
            spec["methods"].append(name)
            spec["defaults"][name] = field.default
    return specs


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """--<field> for every method-config field, stored as `method_<field>`, None unless given."""
    group = parser.add_argument_group(
        "method options", "apply to the methods named in brackets; defaults per method"
    )
    for name, spec in method_option_specs().items():
        defaults = ", ".join(f"{m}={d}" for m, d in spec["defaults"].items())
        text = f"{spec['help']} [{', '.join(spec['methods'])}; default {defaults}]"
        group.add_argument(
            flag_of(name),
            dest=f"method_{name}",
            **field_argument(spec["type"], text, metavar=name.upper()),
        )


def data_source(args: argparse.Namespace) -> DataSource:
    """Where the examples come from (`--data-dir`, or `--train-file`/`--dev-file` with their
    columns), as `microtune train` and `microtune federate` take it."""
    columns = args.text_columns
    return DataSource(
        data_dir=args.data_dir,
        train_file=args.train_file,
        dev_file=args.dev_file,
        text_columns=tuple(columns) if columns else None,
        label_column=args.label_column,
        max_train_examples=args.max_train_examples,
        labels=tuple(args.labels) if getattr(args, "labels", None) else None,
    )


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the user set, checked against the chosen method."""
    allowed = {field.name for field in dataclasses.fields(method_config(args.method))}
    chosen = {
        key.removeprefix("method_"): value
        for key, value in vars(args).items()
        if key.startswith("method_") and value is not None
    }
    wrong = sorted(set(chosen) - allowed)
    if wrong:
        flags = ", ".join(flag_of(name) for name in wrong)
        raise MicrotuneError(f"{flags} does not apply to method '{args.method}'")
    return chosen
