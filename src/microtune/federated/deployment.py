"""The apps for Flower's deployment engine (`flower-superlink`, `flower-supernode`, `flwr run`):
the same client and server as the simulation, with the federation read from the run config
(`examples/flower/pyproject.toml`'s `[tool.flwr.app.config]`, or `flwr run --run-config`).

A SuperNode started with `--node-config "partition-id=0 num-partitions=10"` trains its
Dirichlet share of the task's rows; one started with `--node-config "train-file=... dev-file=..."`
trains on its own rows, and `model-path=...` points at its own copy of the base model.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from microtune.federated.client import client_app
from microtune.federated.server import run_federation
from microtune.federated.spec import spec_from_run_config

clientapp = ClientApp()
serverapp = ServerApp()


@clientapp.train()
def train(message: Message, context: Context) -> Message:
    return client_app(spec_from_run_config(dict(context.run_config)))(message, context)


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, spec_from_run_config(dict(context.run_config)))
