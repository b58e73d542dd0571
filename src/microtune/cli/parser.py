"""The top-level parser, built from the command table, with the CLI's one-line errors."""

from __future__ import annotations

import argparse
import typing

from microtune.cli.commands import COMMANDS
from microtune.version import __version__


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line, exit 2, instead of the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"microtune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="microtune",
        description="Fine-tune a pretrained transformer with a few thousand parameters per task, "
        "then merge it away: zero added inference latency.",
    )
    parser.add_argument("--version", action="version", version=f"microtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add(commands)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed options; argparse's errors, --help and --version exit here."""
    return build_parser().parse_args(argv)
