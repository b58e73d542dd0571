"""`python -m microtune.cli`: the command line (`python -m microtune` also takes Ctrl-C during
its start-up imports cleanly)."""

import sys

from microtune.cli import main

sys.exit(main())
