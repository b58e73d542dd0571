"""The microtune `ClientApp`: one party trains its own rows with microtune's trainer for the
round's local steps, starting from the global state, and sends back only what travels
(`exchange`). A party whose PaFi mask differs from the server's is refused before it trains.

In the simulation every client reads the task's training rows and keeps its Dirichlet share
(`node_config["partition-id"]`); under the deployment engine a SuperNode may instead point at
its own copy of the base model and its own rows (`--node-config "model-path=... train-file=...
dev-file=..."`), and then trains on all of them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from microtune.api import TrainingData, TrainingRun, start_run
from microtune.backbone.options import ModelOptions
from microtune.errors import MicrotuneError
from microtune.federated.exchange import (
    freeze_untravelled,
    load_arrays,
    positions_problem,
    to_arrays,
    travelling_names,
)
from microtune.federated.partition import dirichlet_partition
from microtune.federated.spec import FederationSpec
from microtune.privacy.accounting import calibrate_sigma, epsilon_spent
from microtune.privacy.dpsgd import PrivacyPlugin
from microtune.training.loop import Trainer
from microtune.training.plugins import Plugins
from microtune.training.steps import AdamWStep

REFUSAL = "refusal"  # the ConfigRecord of a reply that refuses the round, with its reason


class ProximalStep(AdamWStep):
    """A party's local step: AdamW on the loss plus FedProx's (mu / 2) ||w - w_global||², the
    global state being what the round started from; with `log_prior` (classification), the
    loss of the logits shifted by tau · log of the party's own label frequencies (logit
    adjustment): under label skew a party then fits what tells the classes apart rather than
    its own label mix, which the server's average cannot undo."""

    def __init__(self, mu: float, log_prior: torch.Tensor | None = None):
        self.mu, self.log_prior = mu, log_prior

    def bind(self, model: nn.Module, parameters: dict, *args: Any, **kwargs: Any) -> None:
        super().bind(model, parameters, *args, **kwargs)
        self.anchor = {name: p.detach().clone() for name, p in parameters.items()}

    def loss(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task type's loss, of the logits shifted by the log prior when there is one."""
        if self.log_prior is not None:
            logits = logits + self.log_prior.to(logits)
        return super().loss(model, logits, labels)

    def gradients(self, model: nn.Module, micro_batches: Iterable, logical_size: int) -> float:
        """The step's gradient plus FedProx's mu (w - w_global); the loss returned is the
        task's alone."""
        loss = super().gradients(model, micro_batches, logical_size)
        if self.mu > 0:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    if parameter.grad is not None:
                        parameter.grad.add_(parameter - self.anchor[name], alpha=self.mu)
        return loss


class LocalParty:
    """One client's encoded rows, on the task model its worker process shares between the
    parties it runs (each round loads the global state into it first)."""

    def __init__(self, spec: FederationSpec, node_config: dict[str, Any]):
        self.spec = spec
        self.partition = int(node_config.get("partition-id", 0))
        self.run, data = _worker_model(spec, node_config)
        train = data.train
        if "train-file" not in node_config:  # the simulation: this client's Dirichlet share
            train = [train[i] for i in _shares(spec, data)[self.partition]]
        self.model = self.run.task_model
        self.names = travelling_names(self.model, spec.lora_frozen_a)
        tokenizer = self.run.tokenizer
        self.rows, self.labels = self.model.encode(tokenizer, train, spec.max_length)
        self.pad_id = tokenizer.pad_token_id
        self.sigma = self._sample_sigma()

    def _sample_sigma(self) -> float | None:
        """Sample-level DP-SGD: σ for the client's target ε over every local step it could
        run (all rounds), so the whole federation stays within the client's budget."""
        dp = self.spec.sample_dp
        if dp is None or dp.sigma is not None:
            return None if dp is None else dp.sigma
        n = len(self.rows)
        steps = self.spec.rounds * self.spec.train_config.max_steps
        return calibrate_sigma(dp.epsilon, self.delta, min(1.0, dp.batch / n), steps, dp.accountant)

    def log_prior(self) -> torch.Tensor | None:
        """tau · log of this party's label frequencies (add-one smoothed), for classification
        with --logit-adjustment tau > 0; None otherwise."""
        tau, num_labels = self.spec.logit_adjustment, self.model.head_config.num_labels
        if tau == 0 or self.model.task_type.name != "classification":
            return None
        labels = torch.as_tensor(self.labels).flatten().long()
        counts = torch.bincount(labels, minlength=num_labels).float() + 1.0
        return tau * (counts / counts.sum()).log()

    @property
    def whose(self) -> dict[str, float]:
        """Which party a reply's DP numbers are of (the server records each party's)."""
        return {"partition": float(self.partition)}

    @property
    def delta(self) -> float:
        dp = self.spec.sample_dp
        return dp.delta if dp is not None and dp.delta is not None else 1 / (2 * len(self.rows))

    def mask_problem(self, config: ConfigRecord, arrays: Any) -> str | None:
        """Why this party cannot take part in the round with the server's PaFi mask."""
        method = self.model.method
        expected = config.get("mask-fingerprint")
        if expected and getattr(method, "mask_fingerprint", expected) != expected:
            return (
                f"client {self.partition}: its PaFi mask ({method.mask_fingerprint[:19]}…) "
                f"differs from the server's ({str(expected)[:19]}…): its base model's weights "
                "differ; use the server's base model"
            )
        problem = positions_problem(self.model, arrays)
        return f"client {self.partition}: {problem}" if problem else None

    def train(
        self,
        server_round: int,
        proximal_mu: float,
        steps_done: int,
        schedule_slice: tuple[int, int] | None = None,
    ) -> dict[str, float]:
        """Local steps from the loaded global state, at the rates of `schedule_slice`
        (start, span) of the federation's schedule (None: a schedule of their own); the
        round's metrics."""
        config = dataclasses.replace(
            self.run.config,
            seed=self.run.config.seed + 1009 * server_round + self.partition,
            progress=False,
            eval_every=0,
            checkpoint_every=0,
        )
        plugins = Plugins()
        dp = self.spec.sample_dp
        if dp is not None:
            dp = dataclasses.replace(dp, epsilon=None, sigma=self.sigma, delta=self.delta)
            plugins = PrivacyPlugin(dp).build(self.model, config, len(self.rows))
        log_prior = self.log_prior()
        step = plugins.step
        if dp is None and (proximal_mu > 0 or log_prior is not None):
            step = ProximalStep(proximal_mu, log_prior)
        if schedule_slice is not None:
            step = (step or AdamWStep()).slice_of(*schedule_slice)
        with tempfile.TemporaryDirectory(prefix="microtune-client-") as folder:
            trainer = Trainer(
                self.model,
                config,
                self.rows,
                self.labels,
                self.pad_id,
                folder,
                sampler=plugins.sampler,
                step=step,
                callbacks=plugins.callbacks,
            )
            trainer.fit()
        metrics = {"num-examples": float(len(self.rows)), "unit": 1.0, "steps": trainer.step}
        if dp is not None:
            q = min(1.0, dp.batch / len(self.rows))
            total = steps_done + trainer.step
            metrics["sample-epsilon"] = epsilon_spent(
                self.sigma, q, total, self.delta, dp.accountant
            )
            metrics |= {"sample-sigma": self.sigma, "sample-delta": self.delta, **self.whose}
        return metrics


_MODELS: dict[str, tuple[TrainingRun, TrainingData]] = {}
_PARTIES: dict[str, LocalParty] = {}


def _worker_model(spec: FederationSpec, node_config: dict[str, Any]) -> tuple:
    """The task model and the rows of this worker process, built once per base model and
    data source."""
    own_rows = "train-file" in node_config
    model = str(node_config.get("model-path", spec.model))
    key = repr((spec, model, node_config.get("train-file"), node_config.get("dev-file")))
    if key not in _MODELS:
        _MODELS.clear()
        source = dataclasses.replace(
            spec.data,
            data_dir=None if own_rows else spec.data.data_dir,
            train_file=node_config.get("train-file", spec.data.train_file),
            dev_file=node_config.get("dev-file", spec.data.dev_file),
        )
        data = TrainingData(spec.task, source)
        data.load()
        options = ModelOptions(name=model, device="cpu", max_length=spec.max_length)
        run = start_run(data, spec.method, spec.method_options, options, spec.train_config)
        freeze_untravelled(run.task_model, spec.lora_frozen_a)
        _MODELS[key] = (run, data)
    return _MODELS[key]


_SHARES: dict[str, list[list[int]]] = {}


def _shares(spec: FederationSpec, data: TrainingData) -> list[list[int]]:
    """Every client's row indices, split once per worker process."""
    key = repr(spec)
    if key not in _SHARES:
        _SHARES.clear()
        _SHARES[key] = dirichlet_partition(
            data.train, spec.clients, spec.alpha, spec.partition_seed
        )
    return _SHARES[key]


def local_party(spec: FederationSpec, node_config: dict[str, Any]) -> LocalParty:
    """The party of this node, built on first use in this worker process."""
    key = repr((spec, sorted(node_config.items())))
    if key not in _PARTIES:
        _PARTIES[key] = LocalParty(spec, node_config)
    return _PARTIES[key]


def schedule_slice(config: ConfigRecord) -> tuple[int, int] | None:
    """(start, span) of the federation's learning-rate schedule the server gave this round."""
    if "schedule-start" not in config:
        return None
    return int(config["schedule-start"]), int(config["schedule-span"])


def client_app(spec: FederationSpec) -> ClientApp:
    """The Flower `ClientApp` of a federation (one `train` handler; evaluation is central)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one core per simulated client
        party = local_party(spec, dict(context.node_config))
        config, arrays = message.content["config"], message.content["arrays"]
        refusal = party.mask_problem(config, arrays)
        if refusal is not None:
            content = RecordDict({REFUSAL: ConfigRecord({"reason": refusal})})
            return Message(content=content, reply_to=message)
        load_arrays(party.model, arrays)
        state = context.state["dp"] if "dp" in context.state else ConfigRecord({"steps": 0})
        try:
            metrics = party.train(
                int(config["server-round"]),
                float(config.get("proximal-mu", 0.0)),
                int(state["steps"]),
                schedule_slice(config),
            )
        except MicrotuneError as error:  # one line in the server's log, not a traceback
            raise RuntimeError(f"client {party.partition}: {error}") from None
        context.state["dp"] = ConfigRecord({"steps": int(state["steps"]) + int(metrics["steps"])})
        content = RecordDict(
            {"arrays": to_arrays(party.model, party.names), "metrics": MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=message)

    return app
