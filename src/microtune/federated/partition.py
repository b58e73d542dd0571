"""The non-IID split of a task's training rows: Dirichlet label skew with flwr-datasets'
`DirichletPartitioner`, on a `datasets.Dataset` built from the local rows (so it works offline)."""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner

from microtune.errors import MicrotuneError
from microtune.tasks.spec import Example


def dirichlet_partition(
    examples: Sequence[Example], clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """Row indices of each client's share: per label, client shares drawn from Dir(alpha)
    (alpha 0.1: most clients see mostly one label; alpha 100: close to IID)."""
    labels = [example.label for example in examples]
    if any(not isinstance(label, int) for label in labels):
        raise MicrotuneError(
            "federate splits rows by label (Dirichlet label skew); this task's labels are not "
            "class indices (regression or per-token tags): use a classification task"
        )
    if len(examples) < 2 * clients:
        raise MicrotuneError(
            f"{len(examples)} training rows cannot be split over {clients} clients; use fewer "
            "--clients or more rows"
        )
    partitioner = DirichletPartitioner(
        num_partitions=clients,
        partition_by="label",
        alpha=alpha,
        # flwr-datasets redraws until every client has this many rows (10 by default).
        min_partition_size=min(10, len(examples) // (2 * clients)),
        self_balancing=False,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": labels, "row": list(range(len(labels)))})
    try:
        return [list(partitioner.load_partition(i)["row"]) for i in range(clients)]
    except ValueError as error:  # "The max number of attempts ... was reached"
        raise MicrotuneError(
            f"no Dirichlet split of {len(examples)} rows over {clients} clients at alpha "
            f"{alpha}: {error}; raise --alpha or lower --clients"
        ) from None
