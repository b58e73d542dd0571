"""The command line: train, eval, predict, generate, merge, export, info, inspect, accountant,
push and bench.

Thin by design: it parses, calls `microtune.api` (or the module a command needs), and prints.

- `commands`: the command table; one module per command (`train`, `evaluate`, `merge`,
  `export`, `predict`, `generate`, `info`, `inspect_model`, `accountant`, `push`, `bench`) adds
  its parser and runs it, importing the heavy stack only inside `run`.
- `options`: argparse options generated from config dataclasses' field metadata: the train
  command's optimisation options from `TrainConfig`, `--dp-*` from `DPConfig`, and the method
  options from the method configs, so a new method's options appear with their help and no CLI
  change.
- `parser`: the top-level parser and its one-line argparse errors.
- `app`: `run` (parse and dispatch) and `main` (JSON out; one-line errors and exit codes).

Building the parser imports only torch-free modules: `microtune --help` is fast.
"""

from microtune.cli.app import main, one_line, os_error_message, run
from microtune.cli.options import method_options as _method_options
from microtune.cli.parser import build_parser

__all__ = ["_method_options", "build_parser", "main", "one_line", "os_error_message", "run"]
