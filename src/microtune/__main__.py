"""`python -m microtune` and the `microtune` script: the command line, with Ctrl-C during the
(slow, torch-importing) start-up ending as cleanly as Ctrl-C anywhere else.

The parser is torch-free, so `--help`, `--version`, argparse's errors and `accountant` never
import torch or transformers; the other commands import them here, before they run."""

import importlib
import os
import signal
import sys


def _interrupted_during_start_up(signum, frame) -> None:
    # A KeyboardInterrupt raised while torch's C code imports numpy is swallowed or turns into
    # a later crash, so Ctrl-C during the imports ends the process here, at once.
    sys.stderr.write("microtune: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def entry() -> int:
    previous = signal.signal(signal.SIGINT, _interrupted_during_start_up)
    try:
        from microtune.cli import main
        from microtune.cli.app import announce
        from microtune.cli.commands import COMMANDS
        from microtune.cli.parser import parse

        args = parse(sys.argv[1:])  # --help, --version and argparse's errors exit here
        announce(args)  # before the imports below: they take seconds
        # The command's heavy modules, imported while the handler holds: a Ctrl-C inside their
        # (lazy, torch-touching) imports is swallowed like the one above.
        for module in COMMANDS[args.command].preload:
            importlib.import_module(module)
    finally:
        signal.signal(signal.SIGINT, previous)
    return main(parsed=args)


if __name__ == "__main__":
    sys.exit(entry())
