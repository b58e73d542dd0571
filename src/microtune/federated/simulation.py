"""A federation on this machine: Flower's simulation engine (Ray) runs the `ServerApp` and
`clients` virtual SuperNodes whose `ClientApp`s are the parties."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from microtune.common.files import METRICS_FILE
from microtune.errors import MicrotuneError
from microtune.federated.client import client_app
from microtune.federated.server import server_app
from microtune.federated.spec import FederationSpec


class RunSimulationDeprecation(logging.Filter):
    """Drops Flower's deprecation warning for `run_simulation` (four lines before every
    federation) and nothing else. Flower 1.32 points to `flwr run`, which runs an app project
    (pyproject.toml, apps named by module path) through a SuperLink; it has no other in-process
    entry point that takes the ServerApp and ClientApp objects microtune builds (`start_simulation`
    is the older, also deprecated one; `run_simulation_process` needs a SuperLink), so the warning
    names nothing a user of `federate` could change."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def without_deprecation_notice() -> Iterator[None]:
    """Flower's logger drops its `run_simulation` deprecation warning within the block."""
    notice = RunSimulationDeprecation()
    logging.getLogger("flwr").addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger("flwr").removeFilter(notice)


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
    with without_deprecation_notice():
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
