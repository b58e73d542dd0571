"""The command table: each command's module adds its parser and runs it.

Every command module imports only torch-free modules at its top, so that the parser (and any
`--help`) builds fast; the heavy stack is imported inside `run`. `preload` names what
`python -m microtune` imports before running the command, while Ctrl-C ends the process at once
(a Ctrl-C inside those imports is otherwise swallowed or turns into a later crash). `status`
gives the line a command shows on stderr before those imports, so that its slow start (the
libraries, the base model) is never silent.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microtune.cli import (
    accountant,
    bench,
    evaluate,
    export,
    federate,
    generate,
    info,
    inspect_model,
    merge,
    plot,
    predict,
    push,
    serve,
    train,
)

HEAVY = ("torch", "transformers")


@dataclass(frozen=True)
class Command:
    add: Callable[[Any], None]  # adds the command's parser to the subparsers
    run: Callable[[argparse.Namespace], Any]  # returns what is printed as JSON
    preload: tuple[str, ...] = HEAVY
    # The status line shown while the command starts (None: none), from its parsed options.
    status: Callable[[argparse.Namespace], str | None] | None = None


# In the order `microtune --help` lists them.
COMMANDS: dict[str, Command] = {
    "train": Command(train.add, train.run),
    "eval": Command(evaluate.add, evaluate.run, status=evaluate.status),
    "merge": Command(merge.add, merge.run),
    "export": Command(export.add, export.run),
    "predict": Command(predict.add, predict.run, status=predict.status),
    "generate": Command(generate.add, generate.run),
    "accountant": Command(accountant.add, accountant.run, preload=()),
    "bench": Command(bench.add, bench.run),
    "federate": Command(federate.add, federate.run),
    "plot": Command(plot.add, plot.run, preload=()),
    "info": Command(info.add, info.run),
    "push": Command(push.add, push.run),
    "inspect": Command(inspect_model.add, inspect_model.run),
    "serve": Command(serve.add, serve.run),
}
