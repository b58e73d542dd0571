"""Running a command: dispatch through the command table, print JSON, and turn every failure
into one line and an exit code (2: the user can fix it, 130: Ctrl-C, 1: a bug of ours)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from typing import Any

from safetensors import SafetensorError

from microtune.cli.commands import COMMANDS
from microtune.cli.parser import parse
from microtune.common.progress import status
from microtune.errors import MicrotuneError

INTERRUPTED = "microtune: interrupted; `train --resume` continues from the last checkpoint"
OS_FIXES = {
    errno.ENOSPC: "free some disk space and run again",
    errno.EACCES: "check the folder's permissions or choose another --output",
    errno.EROFS: "choose a writable --output",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a parent of this path is a file; choose another path",
    errno.EISDIR: "this path is a folder; name a file",
}


def announce(args: argparse.Namespace) -> None:
    """The command's status line on stderr (`Command.status`), shown before its slow start."""
    message_of = COMMANDS[args.command].status
    message = message_of(args) if message_of else None
    if message:
        status(message)


def dispatch(args: argparse.Namespace) -> Any:
    return COMMANDS[args.command].run(args)


def run(argv: list[str] | None = None) -> Any:
    """Parse and run one command; returns what `main` prints. Errors propagate."""
    return dispatch(parse(argv))


def one_line(text: str) -> str:
    """The first non-empty line of a message (library errors are often multi-line reports)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def os_error_message(error: OSError) -> str:
    """An OSError as one line that names the file and the cause (disk full, permission...)."""
    where = error.filename or ""
    cause = error.strerror or one_line(str(error)) or type(error).__name__
    fix = OS_FIXES.get(error.errno, "check the path and run again")
    return f"{where}: {cause}; {fix}" if where else f"{cause}; {fix}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"microtune: warning: {one_line(str(message))}\n"


def failure(error: Exception) -> tuple[str, int]:
    """The one line and exit code of a failed command."""
    if isinstance(error, MicrotuneError):
        return f"microtune: error: {one_line(str(error))}", 2
    if isinstance(error, OSError):  # disk full, read-only folder, vanished file: fixable
        return f"microtune: error: {os_error_message(error)}", 2
    if isinstance(error, SafetensorError):  # its I/O errors (a full disk) are not OSErrors
        return (
            "microtune: error: reading or writing a safetensors file failed: "
            f"{one_line(str(error))}; free disk space or restore the file, then run again"
        ), 2
    return (  # a bug of ours: one line, and how to see the rest
        f"microtune: internal error: {type(error).__name__}: {one_line(str(error))} "
        "(please report it; MICROTUNE_DEBUG=1 shows the traceback)"
    ), 1


def print_result(result: Any) -> None:
    if result is None:  # nothing to show: a training process other than rank 0
        return
    if isinstance(result, list):  # `predict`, `generate`: one JSON line per input
        for record in result:
            print(json.dumps(record))
    else:
        print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None, *, parsed: argparse.Namespace | None = None) -> int:
    """Run the CLI (on `argv`, or on options `parsed` already, whose status line `entry` has
    shown before its imports); user errors exit 2 with one line, Ctrl-C exits 130, nothing
    prints a traceback unless MICROTUNE_DEBUG=1 (an unexpected one exits 1 and asks for a
    report)."""
    debug = os.environ.get("MICROTUNE_DEBUG", "") not in ("", "0")
    if not debug:
        warnings.formatwarning = _one_line_warning  # a warning is one line too
    try:
        if parsed is None:
            parsed = parse(argv)
            announce(parsed)
        result = dispatch(parsed)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as error:
        if debug and not isinstance(error, MicrotuneError):
            raise
        message, code = failure(error)
        print(message, file=sys.stderr)
        return code
    print_result(result)
    return 0
