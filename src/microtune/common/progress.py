"""Progress bars: every bar microtune shows (training steps, evaluation batches, federated
rounds) is a tqdm bar on standard error made here, so all of them behave alike."""

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
