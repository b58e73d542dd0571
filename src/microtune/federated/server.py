"""The microtune `ServerApp`: Flower's strategy (FedAvg weighted by examples, FedProx, FedAdam;
client-level DP through Flower's server-side clipping wrapper, accounted here with Opacus) behind
a screen that leaves out what must not be averaged, a dev evaluation of the global model each
round, and each round's aggregate saved as an ordinary microtune artifact (plus a checkpoint, so
a restarted server resumes from its last round)."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)
from safetensors import safe_open
from safetensors.torch import load_file

from microtune.api import TrainingData, start_run
from microtune.artifacts import folders
from microtune.artifacts.store import save_artifact
from microtune.backbone.options import ModelOptions
from microtune.common.files import (
    CHECKPOINT_FILE,
    LOG_FILE,
    METRICS_FILE,
    atomic_write,
    write_json,
    write_tensors,
)
from microtune.common.progress import progress_bar
from microtune.errors import MicrotuneError
from microtune.federated.client import REFUSAL
from microtune.federated.exchange import (
    POSITIONS,
    arrays_problem,
    expected_shapes,
    load_arrays,
    positions_problem,
    serialised_bytes,
    to_arrays,
    travelling_names,
)
from microtune.federated.partition import dirichlet_partition
from microtune.federated.spec import FederationSpec
from microtune.privacy.accounting import calibrate_sigma, epsilon_spent
from microtune.training.loop import evaluate

logger = logging.getLogger("microtune.federated")


def flower_strategy(spec: FederationSpec, sigma: float | None) -> Strategy:
    """Flower's strategy for the spec; wrapped in Flower's client-level DP clipping."""
    options = {
        "fraction_train": spec.clients_per_round / spec.clients,
        "fraction_evaluate": 0.0,  # evaluation is central, on the server's dev rows
        "min_train_nodes": spec.clients_per_round,
        "min_available_nodes": spec.clients,
        # Client-level DP bounds one client's influence: every client weighs the same.
        "weighted_by_key": "unit" if spec.client_dp else "num-examples",
    }
    if spec.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=spec.proximal_mu, **options)
    elif spec.strategy == "fedadam":
        strategy = FedAdam(eta=spec.server_lr, **options)
    else:
        strategy = FedAvg(**options)
    if spec.client_dp is None:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, sigma, spec.client_dp.clip, spec.clients_per_round
    )


class Screen(Strategy):
    """A Flower strategy around another: counts bytes each way, and leaves out of the
    aggregate (one log line each) replies that failed or timed out, refusals (a different PaFi
    mask), and arrays of the wrong names or shapes or with non-finite values. Fewer than
    `min_replies` kept: the global state stays as it was."""

    def __init__(self, inner: Strategy, server: FederationServer, min_replies: int):
        self.inner, self.server, self.min_replies = inner, server, min_replies
        self.round: dict[str, Any] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.server.budget_spent_by_next_round():
            self.round = {"stopped": "the client-level privacy budget would be exceeded"}
            return []
        config = ConfigRecord({**config, **self.server.schedule_config()})
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        down = [serialised_bytes(message.content) for message in messages]
        self.round = {"sampled": len(messages), "bytes_down": _mean(down)}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept, up, notes = [], [], {"failed": [], "refused": [], "left_out": []}
        notes["failed"] += ["timed out"] * (self.round.get("sampled", 0) - len(replies))
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error() and "metrics" in reply.content:  # it ran its steps
                self.server.note_party_dp(reply.content["metrics"])
            if reply.has_error():
                notes["failed"].append(f"node {node}: {_one_line(reply.error.reason)}")
            elif REFUSAL in reply.content:
                notes["refused"].append(f"node {node}: {reply.content[REFUSAL]['reason']}")
            elif problem := self.server.reply_problem(reply.content):
                notes["left_out"].append(f"node {node}: {problem}")
            else:
                up.append(serialised_bytes(reply.content))
                arrays = reply.content["arrays"]
                if POSITIONS in arrays:  # checked equal to the server's; only values average
                    kept_arrays = {k: v for k, v in arrays.items() if k != POSITIONS}
                    reply.content["arrays"] = ArrayRecord(kept_arrays)
                kept.append(reply)
        for kind, lines in notes.items():
            for line in lines:
                logger.warning(
                    "round %s: client %s: %s", server_round, kind.replace("_", " "), line
                )
        self.round.update(
            joined=len(kept), bytes_up=_mean(up), **{k: len(v) for k, v in notes.items()}
        )
        if len(kept) < self.min_replies:
            self.round["aggregated"] = False
            return None, None
        self.round["aggregated"] = True
        return self.inner.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None


def _mean(values: list[int]) -> float | None:
    return statistics.fmean(values) if values else None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "unknown error"


EMPTY_COUNTS = ("joined", "failed", "refused", "left_out")  # a round's counts, in its error


class FederationServer:
    """The server's task model, dev rows and output folder: evaluates, saves and logs rounds."""

    def __init__(self, spec: FederationSpec, folder: Path):
        self.spec, self.folder, self.started = spec, folder, time.time()
        data = TrainingData(spec.task, spec.data)
        data.load()
        # The clients' split, checked here so a task or size it cannot split stops the run first.
        dirichlet_partition(data.train, spec.clients, spec.alpha, spec.partition_seed)
        self.data = data
        options = ModelOptions(name=spec.model, device="cpu", max_length=spec.max_length)
        self.run = start_run(data, spec.method, spec.method_options, options, spec.train_config)
        self.model = self.run.task_model
        self.names = travelling_names(self.model, spec.lora_frozen_a)
        self.shapes = expected_shapes(self.model, self.names)
        self.dev = self.model.encode(self.run.tokenizer, data.dev, spec.max_length)
        self.sigma = self._client_sigma()
        self.done = 0
        self.trained = False  # whether any round aggregated an update (the state is trained)
        self.party_dp: dict[int, dict[str, float]] = {}  # sample-level DP, as each party spent
        self.log: list[dict[str, Any]] = []
        self.bar = progress_bar(spec.rounds, "rounds", "round", spec.train_config.progress)

    def _client_sigma(self) -> float | None:
        dp = self.spec.client_dp
        if dp is None:
            return None
        return calibrate_sigma(
            dp.epsilon, dp.delta, self.spec.sample_rate, self.spec.rounds, dp.accountant
        )

    def epsilon(self, rounds: int) -> float | None:
        dp = self.spec.client_dp
        if dp is None:
            return None
        return epsilon_spent(self.sigma, self.spec.sample_rate, rounds, dp.delta, dp.accountant)

    def note_party_dp(self, metrics: Any) -> None:
        """A party's sample-level DP as its reply reports it: σ, δ and the ε spent so far."""
        if "sample-epsilon" in metrics:
            self.party_dp[int(metrics["partition"])] = {
                "sigma": float(metrics["sample-sigma"]),
                "delta": float(metrics["sample-delta"]),
                "epsilon_spent": float(metrics["sample-epsilon"]),
            }

    def sample_dp_spent(self) -> dict[str, Any]:
        """What sample-level DP spent: the smallest σ, the largest δ and ε of any party
        (each party's budget is its own), and every party's."""
        parties = [self.party_dp[k] for k in sorted(self.party_dp)]
        return {
            "sigma": min((p["sigma"] for p in parties), default=None),
            "delta": max((p["delta"] for p in parties), default=None),
            "epsilon_spent": max((p["epsilon_spent"] for p in parties), default=None),
            "parties": {str(k): self.party_dp[k] for k in sorted(self.party_dp)},
        }

    def budget_spent_by_next_round(self) -> bool:
        dp = self.spec.client_dp
        return dp is not None and self.epsilon(self.done + 1) > dp.epsilon

    def train_config(self) -> ConfigRecord:
        """What every client is told besides the arrays: the mask it must share (PaFi)."""
        fingerprint = getattr(self.model.method, "mask_fingerprint", None)
        return ConfigRecord({"mask-fingerprint": fingerprint} if fingerprint else {})

    def schedule_config(self) -> dict[str, int]:
        """The next round's slice of the learning-rate schedule: with --schedule federation,
        round r's local steps take the rates of steps (r - 1)·L.. of one warmup/decay over
        rounds × L steps, as centralised training over that many steps would; a model that
        settles as the rate falls, where a schedule restarted every round keeps it swinging."""
        if self.spec.schedule != "federation":
            return {}
        local = int(self.spec.train_config.max_steps)
        return {"schedule-start": self.done * local, "schedule-span": self.spec.rounds * local}

    def reply_problem(self, content: Any) -> str | None:
        if "arrays" not in content:
            return "it sent no arrays"
        arrays = content["arrays"]
        return arrays_problem(arrays, self.shapes) or positions_problem(self.model, arrays)

    # -- rounds ---------------------------------------------------------------------------

    def start_state(self) -> ArrayRecord:
        """The global state to start from: the checkpoint's when resuming, else the seeded
        initial state every client also builds."""
        checkpoint = self.folder / CHECKPOINT_FILE
        if self.spec.resume and checkpoint.is_file():
            self._resume(checkpoint)
        elif (self.folder / LOG_FILE).exists():
            (self.folder / LOG_FILE).unlink()
        return to_arrays(self.model, self.names, positions=False)

    def _resume(self, checkpoint: Path) -> None:
        with safe_open(str(checkpoint), framework="pt") as handle:
            meta = handle.metadata() or {}
        saved = json.loads(meta.get("federation", "{}"))
        now = {k: v for k, v in self.spec.record().items() if k != "rounds"}
        if {k: v for k, v in saved.items() if k != "rounds"} != json.loads(json.dumps(now)):
            raise MicrotuneError(
                f"{checkpoint} was written by a federation with other settings; resume with the "
                "same options (only --rounds may change), or --overwrite to start over"
            )
        private = self.spec.client_dp is not None or self.spec.sample_dp is not None
        if private and saved.get("rounds") != self.spec.rounds:
            # σ was calibrated for the planned rounds: other rounds would price the rounds run
            # at another σ and report the wrong ε.
            raise MicrotuneError(
                f"{checkpoint}: a federation with DP resumes with its planned --rounds "
                f"({saved.get('rounds')}), not {self.spec.rounds}; or --overwrite to start over"
            )
        tensors = load_file(str(checkpoint))
        with torch.no_grad():
            trainable = dict(self.model.named_parameters())
            for name, tensor in tensors.items():
                trainable[name].copy_(tensor)
        self.done, self.trained = int(meta["round"]), True
        lines = (self.folder / LOG_FILE).read_text(encoding="utf-8").splitlines()
        self.log = [json.loads(line) for line in lines if line.strip()][: self.done]
        text = "".join(json.dumps(record) + "\n" for record in self.log)
        atomic_write(self.folder / LOG_FILE, lambda tmp: Path(tmp).write_text(text, "utf-8"))
        self.bar.update(self.done)

    def evaluate_round(self, server_round: int, arrays: ArrayRecord, screen: Screen) -> Any:
        """Flower's central evaluation hook: dev metrics of the new global state, then the
        round's artifact, checkpoint and log line."""
        if server_round == 0 or "stopped" in screen.round:
            return None
        self._check_aggregated(screen.round)
        load_arrays(self.model, arrays)
        task, tokenizer = self.data.task, self.run.tokenizer
        rows, labels = self.dev
        metrics = evaluate(self.model, task, rows, labels, tokenizer.pad_token_id, 64, tokenizer)
        self.done += 1
        line = {"round": self.done, **screen.round, "metrics": metrics}
        if self.spec.client_dp is not None:
            line["epsilon"] = round(self.epsilon(self.done), 4)
        if self.trained:  # never the untrained initial state as if trained
            self.save()
        self.log.append(line)
        with open(self.folder / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")
        shown = {task.main_metric: metrics.get(task.main_metric), "joined": line.get("joined")}
        self.bar.set_postfix(shown | ({"eps": line["epsilon"]} if "epsilon" in line else {}))
        self.bar.update(1)
        return MetricRecord({k: float(v) for k, v in metrics.items() if v is not None})

    def _check_aggregated(self, round_: dict[str, Any]) -> None:
        """A round that aggregated no update stops the federation (one line: why, and what
        the folder holds), unless --allow-empty-rounds; then the state stays as it was."""
        if round_.get("aggregated", True):
            self.trained = True
            return
        counts = ", ".join(f"{round_.get(k, 0)} {k.replace('_', ' ')}" for k in EMPTY_COUNTS)
        what = f"round {self.done + 1} aggregated no update ({counts})"
        if not self.spec.allow_empty_rounds:
            held = f"the artifact holds round {self.done}" if self.trained else "nothing written"
            raise MicrotuneError(
                f"{what}; {held}: raise --round-timeout or lower --min-replies (or fix the "
                "parties, see their lines above), or pass --allow-empty-rounds"
            )
        logger.warning("%s; the global state stays as it was", what)

    def record(self) -> dict[str, Any]:
        record = {**self.spec.record(), "rounds_done": self.done}
        if self.spec.client_dp is not None:
            record["client_dp"] = {
                **record["client_dp"],
                "sigma": self.sigma,
                "sample_rate": self.spec.sample_rate,
                "epsilon_spent": self.epsilon(self.done),
            }
        if self.spec.sample_dp is not None:
            record["sample_dp"] = {**record["sample_dp"], **self.sample_dp_spent()}
        return record

    def save(self) -> None:
        """The round's aggregate as an ordinary artifact, and the checkpoint to resume from."""
        save_artifact(
            self.folder,
            self.model,
            method_name=self.spec.method,
            base_model=self.run.model,
            base_fingerprint=self.run.base_fingerprint,
            task=self.data.record(),
            max_length=self.spec.max_length,
            extra={"federated": self.record()},
            tokenizer=self.run.tokenizer,
        )
        trainable = self.model.trainable_state()
        write_tensors(
            self.folder / CHECKPOINT_FILE,
            {name: trainable[name] for name in trainable},
            metadata={"round": str(self.done), "federation": json.dumps(self.spec.record())},
        )

    def finish(self) -> dict[str, Any]:
        """metrics.json; the checkpoint goes once the last round's artifact is written."""
        self.bar.close()
        if not self.trained:
            raise MicrotuneError(
                f"no round of {self.done} aggregated an update; nothing was written: raise "
                "--round-timeout or lower --min-replies (or fix the parties)"
            )
        (self.folder / CHECKPOINT_FILE).unlink(missing_ok=True)
        last = self.log[-1] if self.log else {}
        ups = [r["bytes_up"] for r in self.log if r.get("bytes_up")]
        downs = [r["bytes_down"] for r in self.log if r.get("bytes_down")]
        report = {
            "task": self.data.task.name,
            "method": self.spec.method,
            "model": self.spec.model,
            "metrics": last.get("metrics", {}),
            "federated": self.record(),
            "bytes_up_per_client_round": _mean(ups),
            "bytes_down_per_client_round": _mean(downs),
            "wall_time_s": round(time.time() - self.started, 2),
        }
        if "epsilon" in last:
            report["epsilon"] = last["epsilon"]
        elif self.party_dp:
            report["epsilon"] = report["federated"]["sample_dp"]["epsilon_spent"]
        write_json(self.folder / METRICS_FILE, report)
        return report


def run_federation(grid: Grid, spec: FederationSpec) -> dict[str, Any]:
    """The server's whole run over a Flower grid (simulation or deployment engine)."""
    protected = folders.base_model_folders([spec.model])
    with folders.training_folder(
        spec.output_dir, resume=spec.resume, overwrite=spec.overwrite, protected=protected
    ) as folder:
        server = FederationServer(spec, folder)
        screen = Screen(flower_strategy(spec, server.sigma), server, spec.min_replies)
        initial = server.start_state()
        remaining = spec.rounds - server.done
        if remaining > 0:
            screen.start(
                grid,
                initial,
                num_rounds=remaining,
                timeout=spec.round_timeout,
                train_config=server.train_config(),
                evaluate_fn=lambda r, arrays: server.evaluate_round(r, arrays, screen),
            )
        return server.finish()


def server_app(spec: FederationSpec, errors: list[BaseException] | None = None) -> ServerApp:
    """The Flower `ServerApp` of a federation; `errors` (simulation) receives what stopped it,
    so the command that started the simulation can report it on one line."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        try:
            run_federation(grid, spec)
        except BaseException as error:
            if errors is None:
                raise
            errors.append(error)

    return app


__all__ = ["server_app", "run_federation", "FederationServer", "Screen", "flower_strategy"]
