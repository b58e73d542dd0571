"""Progress on standard error: every bar microtune shows (training steps, evaluation batches,
federated rounds) is a tqdm bar made here, so all of them behave alike, and `status` is the one
line a command shows while it loads, before its first bar."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr (hidden when not `enabled`). Without a terminal (a log file) every
    redraw is a new line, so it redraws at most every 30 s there."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )


def status(message: str, enabled: bool = True) -> None:
    """One line on stderr saying what is under way (loading the libraries and the base model
    takes tens of seconds before any bar can show), written at once; nothing when not
    `enabled`. Standard output stays the command's result alone."""
    if enabled:
        tqdm.write(f"microtune: {message}", file=sys.stderr)
        sys.stderr.flush()
