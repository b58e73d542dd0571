"""`python -m microtune` and the `microtune` script: the command line, with Ctrl-C during the
(slow, torch-importing) start-up ending as cleanly as Ctrl-C anywhere else."""

import sys


def entry() -> int:
    try:
        from microtune.cli import main
    except KeyboardInterrupt:
        print("microtune: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(entry())
