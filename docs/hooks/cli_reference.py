"""MkDocs hook: the command-line reference, written from `microtune.cli.build_parser()` itself.

`docs/reference/cli.md` holds the placeholder `<!-- cli-help -->`; at build time it becomes one
section per command with that command's `--help`, so the page can never disagree with the
parser. Help is formatted at a fixed width (88 columns: what the theme's code blocks show
without scrolling on a desktop screen) so the page does not depend on the terminal that
builds it.
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

PLACEHOLDER = "<!-- cli-help -->"


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers, in the order `microtune --help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_markdown() -> str:
    """One section per command: its one-line summary and its full `--help`."""
    from microtune.cli import build_parser

    with mock.patch.dict(os.environ, {"COLUMNS": "88"}):
        parser = build_parser()
        sections = ["## microtune", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in command_parsers(parser).items():
            sections += [f"## microtune {name}", "", "```text", sub.format_help().rstrip()]
            sections += ["```", ""]
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, **_) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, cli_markdown())
