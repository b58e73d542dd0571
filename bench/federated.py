"""Federated fine-tuning (issue #19) on MiniLM: what one client sends per round, measured from
what Flower serialises, and whether one FedAvg round equals averaging the clients' merged
weights.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src python3 bench/federated.py

Bytes: the reply's `RecordDict` (the arrays and the metrics) as Flower's protobuf, per method,
with the ratio to full fine-tuning. Exactness: three clients' states (the start plus a random
step each, weighted 10/30/60 examples) averaged by Flower's FedAvg, loaded and merged, against
the weighted mean of the three merged backbones: the largest difference over every weight.
Accuracy (SST-2, vs centralised) comes from `microtune federate` runs (docs/guides/federated.md).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from microtune.api import head_config
from microtune.backbone.arch import arch_for
from microtune.backbone.load import load_backbone
from microtune.backbone.options import ModelOptions
from microtune.common.choices import DEFAULT_MODEL
from microtune.federated.exchange import load_arrays, serialised_bytes, to_arrays, travelling_names
from microtune.methods import build_method
from microtune.model import TaskModel
from microtune.tasks.spec import get_task
from microtune.tasks.types import type_of

METHODS = [
    ("full", {}, False),
    ("slash", {}, False),
    ("pafi", {}, False),
    ("pafi", {"store_indices": True}, False),
    ("hiwi", {}, False),
    ("lora", {}, False),
    ("lora", {}, True),
    ("bitfit", {}, False),
]


def build(method: str, options: dict) -> TaskModel:
    torch.manual_seed(0)
    task = get_task("sst2")
    task_type = type_of(task)
    backbone, _ = load_backbone(DEFAULT_MODEL, "float32", task_type.auto_class)
    head = head_config(task_type, task, arch_for(backbone).causal, ModelOptions())
    return TaskModel(backbone, head, build_method(method, options), task_type=task_type)


def reply_bytes(model: TaskModel, names: list[str]) -> int:
    content = RecordDict(
        {"arrays": to_arrays(model, names), "metrics": MetricRecord({"num-examples": 1000.0})}
    )
    return serialised_bytes(content)


def client_states(model: TaskModel, names: list[str]) -> list[dict[str, np.ndarray]]:
    start = {k: v.numpy() for k, v in to_arrays(model, names).items()}
    rng = np.random.default_rng(0)
    return [
        {
            k: v
            if v.dtype == np.int64
            else (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in start.items()
        }
        for _ in range(3)
    ]


@torch.no_grad()
def merged(model: TaskModel, state: dict[str, np.ndarray], method: str, options: dict) -> dict:
    copy = build(method, options)
    load_arrays(copy, ArrayRecord({k: Array(v) for k, v in state.items()}))
    copy.merge()
    return {k: v.double() for k, v in copy.backbone.state_dict().items()}


def exactness(model: TaskModel, names: list[str], method: str, options: dict) -> float:
    """Largest |merge(FedAvg(states)) - weighted mean of merge(state)| over every weight."""
    states, weights = client_states(model, names), [10.0, 30.0, 60.0]
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                "metrics": MetricRecord({"num-examples": w}),
            }
        )
        for s, w in zip(states, weights, strict=True)
    ]
    average = aggregate_arrayrecords(records, "num-examples")
    of_average = merged(model, {k: v.numpy() for k, v in average.items()}, method, options)
    each = [merged(model, s, method, options) for s in states]
    total = sum(weights)
    gap = 0.0
    for key, value in of_average.items():
        mean = sum(w / total * m[key] for w, m in zip(weights, each, strict=True))
        gap = max(gap, float((value - mean).abs().max()))
    return gap


def main() -> None:
    torch.set_num_threads(1)
    results, full = [], None
    for method, options, frozen_a in METHODS:
        model = build(method, options)
        names = travelling_names(model, frozen_a)
        size = reply_bytes(model, names)
        full = full or size
        label = method + (" +indices" if options else "") + (" frozen-A" if frozen_a else "")
        row = {"method": label, "bytes_up": size, "full_over_this": round(full / size, 1)}
        if method in ("slash", "pafi", "bitfit", "lora") and not options:
            row["merge_gap"] = exactness(model, names, method, options)
        results.append(row)
        print(json.dumps(row), flush=True)
    by = {r["method"]: r["bytes_up"] for r in results}
    print(
        json.dumps(
            {
                "slash_x_less_than_full": round(by["full"] / by["slash"], 1),
                "pafi_x_less_than_full": round(by["full"] / by["pafi"], 1),
                "pafi_index_bytes": by["pafi +indices"] - by["pafi"],
            }
        )
    )


if __name__ == "__main__":
    main()
