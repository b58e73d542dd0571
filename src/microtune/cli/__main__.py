"""`python -m microtune.cli`: the same as `python -m microtune`."""

import sys

from microtune.__main__ import entry

sys.exit(entry())
