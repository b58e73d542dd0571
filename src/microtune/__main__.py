"""`python -m microtune` runs the command line."""

import sys

from microtune.cli import main

sys.exit(main())
