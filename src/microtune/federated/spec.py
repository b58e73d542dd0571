"""The settings a federation's server and clients share: plain data, so it travels to Flower's
simulation workers (Ray actors) as it is and can be written to the artifact."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from microtune.common.choices import DEFAULT_MODEL
from microtune.errors import MicrotuneError
from microtune.privacy.config import DPConfig
from microtune.tasks.spec import TASKS, DataSource
from microtune.training.config import TrainConfig

STRATEGIES = ("fedavg", "fedprox", "fedadam")
SCHEDULES = ("federation", "round")


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP: each client's update clipped to `clip` (L2, over everything it sends)
    on the server, Gaussian noise of σ·clip on the sum (Flower's server-side fixed clipping), σ
    calibrated for `epsilon` over the planned rounds with Opacus' accountant."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if not 0 < self.epsilon < math.inf:
            raise MicrotuneError(
                f"--client-dp-epsilon must be positive and finite, got {self.epsilon}"
            )
        if not 0 < self.delta < 1:
            raise MicrotuneError(f"--client-dp-delta must be in (0, 1), got {self.delta}")
        if not self.clip > 0:
            raise MicrotuneError(f"--client-dp-clip must be positive, got {self.clip}")


@dataclass(frozen=True)
class FederationSpec:
    """One federation: the task and method as `microtune train` takes them, the split of the
    training rows over `clients`, and the rounds. `train_config.max_steps` is the local steps a
    client runs per round."""

    task: str
    method: str
    output_dir: str
    train_config: TrainConfig
    model: str = DEFAULT_MODEL
    method_options: dict[str, Any] = field(default_factory=dict)
    data: DataSource = DataSource()
    max_length: int = 128
    clients: int = 10
    clients_per_round: int = 3
    rounds: int = 20
    alpha: float = 1.0
    partition_seed: int = 0
    strategy: str = "fedavg"
    schedule: str = "federation"
    proximal_mu: float = 0.01
    logit_adjustment: float = 1.0
    server_lr: float = 0.1
    min_replies: int = 1
    round_timeout: float = 600.0
    allow_empty_rounds: bool = False
    lora_frozen_a: bool = False
    client_dp: ClientDP | None = None
    sample_dp: DPConfig | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.clients < 1 or not 1 <= self.clients_per_round <= self.clients:
            raise MicrotuneError(
                f"--clients-per-round must be between 1 and --clients ({self.clients}), got "
                f"{self.clients_per_round}"
            )
        if self.rounds < 1:
            raise MicrotuneError(f"--rounds must be at least 1, got {self.rounds}")
        self.data.check_for_training()
        if not 0 < self.alpha < math.inf:  # inf: no Dirichlet draw (NaN shares)
            raise MicrotuneError(f"--alpha must be positive and finite, got {self.alpha}")
        self._check_settings()
        if not 0 <= self.logit_adjustment < float("inf"):
            raise MicrotuneError(
                f"--logit-adjustment must be >= 0 (0: off), got {self.logit_adjustment}"
            )
        if self.strategy not in STRATEGIES:
            raise MicrotuneError(f"--strategy '{self.strategy}' unknown; use {STRATEGIES}")
        if self.schedule not in SCHEDULES:
            raise MicrotuneError(f"--schedule '{self.schedule}' unknown; use {SCHEDULES}")
        if not 1 <= self.min_replies <= self.clients_per_round:
            raise MicrotuneError(
                f"--min-replies must be between 1 and --clients-per-round, got {self.min_replies}"
            )
        if self.train_config.max_steps is None:
            raise MicrotuneError("set --local-steps: the steps each client runs per round")
        if self.lora_frozen_a and self.method != "lora":
            raise MicrotuneError("--lora-frozen-a applies to --method lora only")
        if self.client_dp is not None and self.sample_dp is not None:
            raise MicrotuneError("choose client-level DP or sample-level DP-SGD, not both")

    def _check_settings(self) -> None:
        """Issue 23: the task splits by label; rates and timeouts positive and finite; issue
        32: client-level δ below 1/N."""
        task = TASKS.get(self.task)
        if task is not None and task.type != "classification":
            raise MicrotuneError(
                f"federate splits rows by label (Dirichlet label skew); '{self.task}' is a "
                f"{task.type} task: use a classification task"
            )
        for flag, value, low in (
            ("--round-timeout", self.round_timeout, 0.0),
            ("--server-lr", self.server_lr, 0.0),
        ):
            if not low < value < math.inf:
                raise MicrotuneError(f"{flag} must be positive and finite, got {value}")
        if not 0 <= self.proximal_mu < math.inf:
            raise MicrotuneError(f"--proximal-mu must be >= 0 and finite, got {self.proximal_mu}")
        dp = self.client_dp
        if dp is not None and dp.delta >= 1 / self.clients:  # as train's δ < 1/N, N parties
            raise MicrotuneError(
                f"--client-dp-delta {dp.delta} is not below 1/--clients = 1/{self.clients}: it "
                f"would allow leaking one party's data outright; use at most "
                f"{1 / (2 * self.clients):.3g} (1/(2N))"
            )

    @property
    def sample_rate(self) -> float:
        """The chance that a client takes part in a round (client-level DP's q)."""
        return self.clients_per_round / self.clients

    def record(self) -> dict[str, Any]:
        """What the artifact and metrics.json record of the federation (JSON)."""
        record = dataclasses.asdict(self)
        for key in ("output_dir", "resume", "overwrite", "train_config", "method_options", "data"):
            record.pop(key)
        record.pop("allow_empty_rounds")  # how a run reacts, not what it trains (resume ignores)
        source = self.data
        record |= {
            key: getattr(source, key)
            for key in ("data_dir", "train_file", "dev_file", "label_column", "max_train_examples")
        }
        record["local_steps"] = self.train_config.max_steps
        record["text_columns"] = list(source.text_columns) if source.text_columns else None
        return {key: value for key, value in record.items() if value is not None}


def spec_from_run_config(config: dict[str, Any]) -> FederationSpec:
    """A spec from a Flower run config (`[tool.flwr.app.config]` of a Flower app's pyproject,
    or `flwr run --run-config`): flat keys with dashes, as Flower's own examples write them."""
    values = {key.replace("-", "_"): value for key, value in config.items()}
    train = {
        "max_steps": int(values.pop("local_steps", 50)),
        "progress": bool(values.pop("progress", True)),
    }
    for key in (
        "learning_rate",
        "batch_size",
        "seed",
        "weight_decay",
        "warmup_ratio",
        "lr_schedule",
    ):
        if key in values:
            train[key] = values.pop(key)
    options = json.loads(values.pop("method_options", "{}") or "{}")
    client_dp = None
    if values.get("client_dp_epsilon"):
        client_dp = ClientDP(
            float(values.pop("client_dp_epsilon")),
            float(values.pop("client_dp_delta", 1e-5)),
            float(values.pop("client_dp_clip", 1.0)),
        )
    values = {k: v for k, v in values.items() if not k.startswith("client_dp_") and v != ""}
    if isinstance(values.get("text_columns"), str):
        values["text_columns"] = tuple(values["text_columns"].split(","))
    data_keys = {f.name for f in dataclasses.fields(DataSource)} - {"labels"}
    data = DataSource(**{key: values.pop(key) for key in data_keys & set(values)})
    known = {f.name for f in dataclasses.fields(FederationSpec)} - {"data"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MicrotuneError(f"unknown run-config keys {unknown}; see microtune federate --help")
    return FederationSpec(
        train_config=TrainConfig(**train),
        method_options=options,
        data=data,
        client_dp=client_dp,
        **values,
    )
