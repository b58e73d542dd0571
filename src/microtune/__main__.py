"""`python -m microtune` and the `microtune` script: the command line, with Ctrl-C during the
(slow, torch-importing) start-up ending as cleanly as Ctrl-C anywhere else."""

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

        # Most commands need it, and a Ctrl-C inside its (lazy, torch-touching) import is
        # swallowed like the one above: import it while the handler holds.
        importlib.import_module("transformers")
    finally:
        signal.signal(signal.SIGINT, previous)
    return main()


if __name__ == "__main__":
    sys.exit(entry())
