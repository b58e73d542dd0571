"""A federation on this machine: Flower's simulation engine (Ray) runs the `ServerApp` and
`clients` virtual SuperNodes whose `ClientApp`s are the parties."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from microtune.common.files import METRICS_FILE
from microtune.errors import MicrotuneError
from microtune.federated.client import client_app
from microtune.federated.server import server_app
from microtune.federated.spec import FederationSpec


def simulate(
    spec: FederationSpec,
    *,
    workers: int = 1,
    verbose: bool = False,
    client: ClientApp | None = None,
) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine, `workers` clients at a time (one CPU
    each); returns metrics.json. What stopped the server is raised here, as one line.

    `client`: a `ClientApp` to run instead of `client_app(spec)` (one that wraps it, e.g.
    with Flower mods, or a party that misbehaves)."""
    if not verbose:  # Flower's INFO lines would bury the progress bar
        logging.getLogger("flwr").setLevel(logging.WARNING)
    errors: list[BaseException] = []
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": workers,
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }
    # Ray's workers read the one thread each is given; the server runs in this process.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU: quiet Ray
    run_simulation(
        server_app(spec, errors),
        client or client_app(spec),
        num_supernodes=spec.clients,
        backend_name="ray",
        backend_config=backend,
        verbose_logging=verbose,
    )
    if errors:
        error = errors[0]
        if isinstance(error, MicrotuneError):
            raise error
        raise MicrotuneError(f"the federation's server stopped: {error!r}") from error
    metrics = os.path.join(spec.output_dir, METRICS_FILE)
    if not os.path.isfile(metrics):
        raise MicrotuneError(
            "the simulation ended without a result; run again with --verbose to see Flower's log"
        )
    with open(metrics, encoding="utf-8") as handle:
        return json.load(handle)
