"""Checks of plain values that many layers share (no torch here: the CLI's configs use them)."""

from __future__ import annotations

from microtune.errors import MicrotuneError

# Seeds are 32-bit unsigned, as numpy's legacy seeding takes them; the derived torch seeds
# (seed * 100_003 + epoch in `data.epoch_order`, hashes elsewhere) then stay far inside
# torch's 64-bit range.
MAX_SEED = 2**32 - 1


def check_seed(flag: str, seed: int) -> None:
    """Refuse a seed outside 0..MAX_SEED (a huge one overflows torch's generator seeding)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise MicrotuneError(f"{flag} must be a whole number in 0..{MAX_SEED}, got {seed!r}")
