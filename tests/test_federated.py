"""Federated fine-tuning on Flower (issue #19), on the tiny models: a real simulation (Ray)
that beats chance and survives a crashing client, the server's aggregate against a hand-computed
weighted mean, and a party whose PaFi mask differs refused before it trains."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from microtune import api
from microtune.cli import main
from microtune.common.files import CONFIG_FILE, LOG_FILE
from microtune.errors import MicrotuneError
from microtune.federated.client import REFUSAL, LocalParty, ProximalStep, client_app, local_party
from microtune.federated.exchange import POSITIONS, to_arrays
from microtune.federated.server import FederationServer, Screen, flower_strategy
from microtune.federated.simulation import simulate
from microtune.federated.spec import ClientDP, FederationSpec
from microtune.privacy.config import DPConfig
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig
from microtune.training.steps import AdamWStep


def spec_for(tiny_model_dirs, toy_files, output, method="full", **changes) -> FederationSpec:
    options = {
        "task": "sst2",
        "method": method,
        "output_dir": str(output),
        "model": str(tiny_model_dirs["bert"]),
        "data": DataSource(
            train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
        ),
        "train_config": TrainConfig(
            max_steps=40, batch_size=8, learning_rate=3e-3, progress=False, eval_every=0
        ),
        "clients": 3,
        "clients_per_round": 3,
        "rounds": 3,
        "alpha": 1.0,
    }
    return FederationSpec(**(options | changes))


def crashing_in_round_two(spec: FederationSpec) -> ClientApp:
    """microtune's client app, except that party 1 crashes in round 2."""
    app, inner = ClientApp(), client_app(spec)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        crash = context.node_config["partition-id"] == 1
        if crash and message.content["config"]["server-round"] == 2:
            raise RuntimeError("party 1 lost power")
        return inner(message, context)

    return app


def test_three_clients_beat_chance_survive_a_crash_and_make_an_artifact(
    tiny_model_dirs, toy_files, tmp_path
):
    output = tmp_path / "fed"
    train_config = TrainConfig(
        max_steps=120, batch_size=8, learning_rate=3e-3, progress=False, eval_every=0
    )
    # Near-IID (label skew has its own tests): with 96 toy rows, 3 parties at alpha 1 can hold
    # a handful of one label each, and what the model learns then rests on which party crashed.
    spec = spec_for(tiny_model_dirs, toy_files, output, train_config=train_config, alpha=100.0)
    report = simulate(spec, workers=2, client=crashing_in_round_two(spec))
    rounds = [json.loads(line) for line in (output / LOG_FILE).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [(r["joined"], r["failed"]) for r in rounds] == [(3, 0), (2, 1), (3, 0)]
    assert all(r["aggregated"] for r in rounds)
    # Majority class of the toy dev set is 17/32 = 0.53.
    assert report["metrics"]["accuracy"] >= 0.8
    assert report["bytes_up_per_client_round"] > 0
    # The aggregate is an ordinary artifact: eval gives the same number, merge works.
    dev = str(toy_files / "dev.jsonl")
    assert api.evaluate_artifact(output, data=DataSource(dev_file=dev)) == report["metrics"]
    merged = api.merge_artifact(output, tmp_path / "merged")
    assert merged is not None


def reply(arrays: dict[str, np.ndarray], examples: int, node: int) -> Message:
    sent = Message(RecordDict({}), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples, "unit": 1}),
        }
    )
    return Message(content, reply_to=sent)


def test_the_aggregate_is_the_weighted_mean_and_bad_replies_are_left_out(
    tiny_model_dirs, toy_files, tmp_path
):
    spec = spec_for(
        tiny_model_dirs, toy_files, tmp_path / "out", method="slash", method_options={"d": 8}
    )
    server = FederationServer(spec, tmp_path / "out")
    screen = Screen(flower_strategy(spec, None), server, min_replies=1)
    screen.round = {"sampled": 5}
    start = {k: v.numpy() for k, v in to_arrays(server.model, server.names).items()}
    rng = np.random.default_rng(0)
    clients = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}]
    clients += [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}]
    clients += [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}]
    weights = [10, 30, 60]
    name = next(iter(start))
    wrong_shape = {**clients[0], name: np.zeros(3, np.float32)}
    not_finite = {k: np.full_like(v, np.nan) for k, v in clients[0].items()}
    replies = [reply(c, w, i + 1) for i, (c, w) in enumerate(zip(clients, weights, strict=True))]
    replies += [reply(wrong_shape, 1000, 7), reply(not_finite, 1000, 8)]
    aggregate, _ = screen.aggregate_train(1, replies)
    for key in start:
        expected = sum(w * c[key] for w, c in zip(weights, clients, strict=True)) / sum(weights)
        np.testing.assert_allclose(aggregate[key].numpy(), expected, rtol=0, atol=1e-6)
    assert screen.round | {"bytes_up": 0} == {
        "sampled": 5,
        "joined": 3,
        "failed": 0,
        "refused": 0,
        "left_out": 2,
        "aggregated": True,
        "bytes_up": 0,
    }


def test_a_party_whose_pafi_mask_differs_is_refused_before_it_trains(
    tiny_model_dirs, toy_files, tmp_path
):
    spec = spec_for(
        tiny_model_dirs, toy_files, tmp_path / "out", method="pafi", method_options={"k": 64}
    )
    server = FederationServer(spec, tmp_path / "out")
    # The party's copy of the base differs: the candidates' smallest weights move.
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dirs["bert"], other)
    weights = load_file(other / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for key, tensor in weights.items():
        if key.endswith("weight") and tensor.dim() == 2 and "embeddings" not in key:
            weights[key] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    message = Message(
        RecordDict(
            {
                "arrays": to_arrays(server.model, server.names),
                "config": ConfigRecord({"server-round": 1} | dict(server.train_config())),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    app = client_app(spec)

    def party(node_config):
        context = Context(1, 1, node_config, RecordDict(), {})
        return app(message, context)

    same = party({"partition-id": 0, "num-partitions": 3})
    assert REFUSAL not in same.content
    assert POSITIONS not in same.content["arrays"]  # values only
    assert tuple(same.content["arrays"]["method.values"].shape) == (64,)
    refused = party({"partition-id": 1, "num-partitions": 3, "model-path": str(other)})
    reason = refused.content[REFUSAL]["reason"]
    assert "PaFi mask" in reason and "differs from the server's" in reason
    assert "\n" not in reason and "arrays" not in refused.content
    screen = Screen(flower_strategy(spec, None), server, min_replies=1)
    screen.round = {"sampled": 2}
    aggregate, _ = screen.aggregate_train(1, [same, refused])
    assert screen.round["refused"] == 1 and screen.round["joined"] == 1
    np.testing.assert_array_equal(
        aggregate["method.values"].numpy(), same.content["arrays"]["method.values"].numpy()
    )


def test_a_restarted_server_resumes_from_its_last_round(tiny_model_dirs, toy_files, tmp_path):
    spec = spec_for(
        tiny_model_dirs, toy_files, tmp_path, method="slash", method_options={"d": 8}, rounds=5
    )
    first = FederationServer(spec, tmp_path)
    first.start_state()
    screen = Screen(flower_strategy(spec, None), first, min_replies=1)
    screen.round = {"joined": 3}
    moved = {k: Array(v.numpy() + 0.5) for k, v in to_arrays(first.model, first.names).items()}
    for server_round in (1, 2):
        first.evaluate_round(server_round, ArrayRecord(moved), screen)
    # The server dies here; a new one resumes from round 2's state, and only the rounds left run.
    again = FederationServer(dataclasses.replace(spec, resume=True), tmp_path)
    state = again.start_state()
    assert again.done == 2 and len(again.log) == 2
    # The schedule goes on where it stopped: round 3 takes steps 80.. of 5 rounds x 40.
    assert again.schedule_config() == {"schedule-start": 80, "schedule-span": 200}
    for name, array in moved.items():
        np.testing.assert_array_equal(state[name].numpy(), array.numpy())
    changed = dataclasses.replace(spec, resume=True, alpha=0.5)
    with pytest.raises(MicrotuneError, match="other settings"):
        FederationServer(changed, tmp_path).start_state()


def test_a_private_federation_resumes_only_with_its_planned_rounds(
    tiny_model_dirs, toy_files, tmp_path
):
    """σ is calibrated for the planned rounds: another --rounds would misreport ε."""
    spec = spec_for(
        tiny_model_dirs, toy_files, tmp_path, method="slash", method_options={"d": 8}, rounds=5
    )
    spec = dataclasses.replace(spec, client_dp=ClientDP(8.0))
    first = FederationServer(spec, tmp_path)
    state = first.start_state()
    first.evaluate_round(1, state, Screen(flower_strategy(spec, first.sigma), first, 1))
    more = dataclasses.replace(spec, resume=True, rounds=8)
    with pytest.raises(MicrotuneError, match=r"planned --rounds \(5\), not 8"):
        FederationServer(more, tmp_path).start_state()
    assert FederationServer(dataclasses.replace(spec, resume=True), tmp_path).start_state()


class FlowerLog(logging.Handler):
    """What Flower logs during a test (its own console handler writes to a stream pytest's
    capture fixtures may not see)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_client_level_dp_from_the_command_line(tiny_model_dirs, toy_files, tmp_path, capsys):
    output = tmp_path / "dp"
    argv = ["federate", "--task", "sst2", "--method", "slash", "--d", "8", "--output", str(output)]
    argv += [
        "--model",
        str(tiny_model_dirs["bert"]),
        "--train-file",
        str(toy_files / "train.jsonl"),
    ]
    argv += ["--dev-file", str(toy_files / "dev.jsonl"), "--clients", "4", "--clients-per-round"]
    argv += ["2", "--rounds", "3", "--local-steps", "3", "--batch-size", "8", "--no-progress"]
    argv += ["--client-dp-epsilon", "8", "--client-dp-delta", "1e-3", "--workers", "2"]
    flower = FlowerLog()
    logging.getLogger("flwr").addHandler(flower)
    try:
        assert main(argv) == 0
    finally:
        logging.getLogger("flwr").removeHandler(flower)
    capsys.readouterr()
    # No deprecation notice for Flower's run_simulation (issue 32): users cannot act on it.
    assert not [m for m in flower.messages if "deprecated" in m.lower()], flower.messages
    rounds = [json.loads(line) for line in (output / LOG_FILE).read_text().splitlines()]
    spent = [r["epsilon"] for r in rounds]
    assert spent == sorted(spent) and 0 < spent[0] < spent[-1] <= 8.0
    record = json.loads((output / CONFIG_FILE).read_text())["federated"]["client_dp"]
    assert record["epsilon"] == 8.0 and record["sample_rate"] == 0.5 and record["sigma"] > 0
    assert record["epsilon_spent"] == pytest.approx(spent[-1], abs=1e-3)


def test_a_regression_task_is_refused_in_one_line(tiny_model_dirs, toy_files, tmp_path, capsys):
    argv = ["federate", "--task", "stsb", "--output", str(tmp_path / "x"), "--no-progress"]
    argv += ["--model", str(tiny_model_dirs["bert"]), "--clients", "2", "--clients-per-round", "2"]
    argv += ["--train-file", str(toy_files / "train.jsonl"), "--dev-file"]
    argv += [str(toy_files / "dev.jsonl"), "--text-columns", "sentence", "--rounds", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("microtune: error: federate splits rows by label")
    assert "'stsb' is a regression task" in error


@pytest.mark.parametrize(
    ("method", "options", "frozen_a", "strategy"),
    [
        ("jrwarp", {}, False, "fedadam"),
        ("bitfit", {}, False, "fedprox"),
        ("lora", {}, True, "fedavg"),
        ("hiwi", {}, False, "fedavg"),
        ("linear", {}, False, "fedavg"),
        ("pafi", {"k": 64, "store_indices": True}, False, "fedadam"),
    ],
)
def test_one_round_of_every_method_is_an_ordinary_artifact(
    tiny_model_dirs, toy_files, tmp_path, method, options, frozen_a, strategy
):
    """Two parties' replies through the client app, the screen and Flower's strategy (FedProx
    with the proximal step on the parties), without Ray."""
    spec = spec_for(
        tiny_model_dirs,
        toy_files,
        tmp_path,
        method=method,
        method_options=options,
        lora_frozen_a=frozen_a,
        clients=2,
        clients_per_round=2,
        train_config=TrainConfig(max_steps=3, batch_size=8, progress=False),
        strategy=strategy,
    )
    server = FederationServer(spec, tmp_path)
    config = ConfigRecord({"server-round": 1, "proximal-mu": 0.1} | dict(server.train_config()))
    start = server.start_state()
    sent = RecordDict({"arrays": start, "config": config})
    app, replies = client_app(spec), []
    for party in (0, 1):
        context = Context(1, party + 1, {"partition-id": party}, RecordDict(), {})
        replies.append(app(Message(sent, dst_node_id=party + 1, message_type="train"), context))
    assert all(REFUSAL not in r.content for r in replies)
    if frozen_a:
        assert not any(name.endswith(".A") for name in replies[0].content["arrays"])
    if options.get("store_indices"):
        assert POSITIONS in replies[0].content["arrays"] and POSITIONS not in start
    screen = Screen(flower_strategy(spec, None), server, min_replies=2)
    screen.inner.current_arrays = {k: v.numpy() for k, v in start.items()}  # FedAdam's
    screen.round = {"sampled": 2}
    aggregate, _ = screen.aggregate_train(1, replies)
    assert screen.round["joined"] == 2 and set(aggregate) == set(start)
    server.evaluate_round(1, aggregate, screen)
    dev = str(toy_files / "dev.jsonl")
    assert (
        api.evaluate_artifact(tmp_path, data=DataSource(dev_file=dev)) == server.log[-1]["metrics"]
    )


def test_sample_level_dp_on_a_party_accounts_across_rounds(tiny_model_dirs, toy_files, tmp_path):
    spec = spec_for(
        tiny_model_dirs,
        toy_files,
        tmp_path,
        method="slash",
        method_options={"d": 8},
        train_config=TrainConfig(max_steps=2, batch_size=8, progress=False),
        sample_dp=DPConfig(epsilon=8.0, batch=8, noise_seed=0),
    )
    server = FederationServer(spec, tmp_path)
    app, state, spent = client_app(spec), RecordDict(), []
    for server_round in (1, 2, 3):
        config = ConfigRecord({"server-round": server_round})
        sent = RecordDict({"arrays": server.start_state(), "config": config})
        context = Context(1, 1, {"partition-id": 0}, state, {})
        reply = app(Message(sent, dst_node_id=1, message_type="train"), context)
        spent.append(reply.content["metrics"]["sample-epsilon"])
    # sigma is calibrated for every step the party could run (3 rounds x 2 steps): the budget
    # holds at the end, and each round spends more.
    assert 0 < spent[0] < spent[1] < spent[2] <= 8.0 * 1.001


def test_sample_level_dp_records_sigma_delta_and_epsilon_spent_and_info_shows_it(
    tiny_model_dirs, toy_files, tmp_path
):
    """Two parties' replies through the screen into the artifact: what each spent, not only
    the target; `info` shows it."""
    spec = spec_for(
        tiny_model_dirs,
        toy_files,
        tmp_path,
        method="slash",
        method_options={"d": 8},
        clients=2,
        clients_per_round=2,
        train_config=TrainConfig(max_steps=2, batch_size=8, progress=False),
        sample_dp=DPConfig(epsilon=8.0, batch=8, noise_seed=0),
    )
    server = FederationServer(spec, tmp_path)
    config = ConfigRecord({"server-round": 1} | dict(server.train_config()))
    sent = RecordDict({"arrays": server.start_state(), "config": config})
    app, replies = client_app(spec), []
    for party in (0, 1):
        context = Context(1, party + 1, {"partition-id": party}, RecordDict(), {})
        replies.append(app(Message(sent, dst_node_id=party + 1, message_type="train"), context))
    screen = Screen(flower_strategy(spec, None), server, min_replies=2)
    screen.round = {"sampled": 2}
    aggregate, _ = screen.aggregate_train(1, replies)
    server.evaluate_round(1, aggregate, screen)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())["federated"]["sample_dp"]
    assert record["epsilon"] == 8.0 and set(record["parties"]) == {"0", "1"}
    assert record["sigma"] > 0 and 0 < record["delta"] < 1
    assert 0 < record["epsilon_spent"] <= 8.0 * 1.001
    spent = [r.content["metrics"]["sample-epsilon"] for r in replies]
    assert record["epsilon_spent"] == pytest.approx(max(spent))
    shown = api.artifact_summary(tmp_path)["privacy"]
    assert shown["level"] == "sample (federated)"
    assert shown["epsilon_spent"] == record["epsilon_spent"] and shown["sigma"] == record["sigma"]


def test_logit_adjustment_shifts_a_partys_logits_by_its_own_label_prior(
    tiny_model_dirs, toy_files, tmp_path
):
    spec = spec_for(tiny_model_dirs, toy_files, tmp_path, alpha=0.1, logit_adjustment=0.5)
    party = local_party(spec, {"partition-id": 0})
    counts = torch.bincount(torch.tensor(party.labels), minlength=2).double() + 1
    prior = party.log_prior()
    torch.testing.assert_close(prior.double(), 0.5 * (counts / counts.sum()).log())
    assert float(prior.max() - prior.min()) > 0.1  # alpha 0.1: a skewed party
    model = party.model
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    step = ProximalStep(0.0, prior)
    step.bind(model, parameters, spec.train_config, 10)
    model.zero_grad()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])}
    inputs["attention_mask"] = (inputs["input_ids"] != 0).long()
    labels = torch.tensor([0, 1])
    loss = step.gradients(model, [(inputs, labels)], 2)
    got = {n: p.grad.clone() for n, p in parameters.items() if p.grad is not None}
    assert got  # the head at least
    model.zero_grad()
    expected = torch.nn.functional.cross_entropy(model(**inputs) + prior, labels)
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-6)
    for name, grad in got.items():
        torch.testing.assert_close(grad, parameters[name].grad)
    plain = dataclasses.replace(spec, logit_adjustment=0.0)
    assert LocalParty(plain, {"partition-id": 0}).log_prior() is None
    with pytest.raises(MicrotuneError, match="--logit-adjustment"):
        dataclasses.replace(spec, logit_adjustment=-1.0)


def rates(step: AdamWStep, config: TrainConfig, steps: int) -> list[float]:
    """The learning rate of each of `steps` updates the step makes (on one zero-gradient
    parameter, so only the schedule moves)."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    step.bind(torch.nn.Linear(1, 1), {"p": parameter}, config, steps)
    seen = []
    for _ in range(steps):
        seen.append(step.learning_rate)
        parameter.grad = torch.zeros(2)
        step.optimizer.step()
        step.scheduler.step()
    return seen


def test_rounds_follow_one_schedule_over_the_federation():
    """--schedule federation: round r's local steps take the rates of steps (r - 1) L.. of
    the centralised schedule over rounds x L steps (warmup included), not a restarted one."""
    rounds, local = 4, 5
    config = TrainConfig(learning_rate=0.1, warmup_ratio=0.1, max_steps=local)
    centralised = rates(AdamWStep(), config, rounds * local)
    federated = []
    for done in range(rounds):
        federated += rates(AdamWStep().slice_of(done * local, rounds * local), config, local)
    assert federated == pytest.approx(centralised, abs=1e-12)
    restarted = rates(AdamWStep(), config, local) * rounds
    assert restarted != pytest.approx(centralised, abs=1e-3)
    with pytest.raises(MicrotuneError, match="schedule slice must start"):
        AdamWStep().slice_of(20, 20)


def too_slow(spec: FederationSpec) -> ClientApp:
    """microtune's client app, except that every party answers only after 20 s."""
    app, inner = ClientApp(), client_app(spec)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        time.sleep(20)
        return inner(message, context)

    return app


def test_a_federation_whose_round_aggregated_nothing_fails_and_writes_nothing(
    tiny_model_dirs, toy_files, tmp_path
):
    """Issue 32: --round-timeout so short that no party answers: one line and no artifact,
    never the untrained initial state as if trained."""
    output = tmp_path / "fed"
    spec = spec_for(tiny_model_dirs, toy_files, output, clients=2, clients_per_round=2)
    spec = dataclasses.replace(spec, rounds=2, round_timeout=1.0)
    with pytest.raises(MicrotuneError) as error:
        simulate(spec, workers=2, client=too_slow(spec))
    assert "round 1 aggregated no update (0 joined, 2 failed" in str(error.value)
    assert "nothing written" in str(error.value) and "--allow-empty-rounds" in str(error.value)
    assert not (output / CONFIG_FILE).exists() and not (output / "metrics.json").exists()


def test_an_empty_round_after_a_trained_one_stops_unless_allowed(
    tiny_model_dirs, toy_files, tmp_path
):
    spec = spec_for(tiny_model_dirs, toy_files, tmp_path / "a", method="slash", rounds=3)
    spec = dataclasses.replace(spec, method_options={"d": 8})
    empty = {"sampled": 3, "joined": 0, "failed": 3, "aggregated": False}
    server = FederationServer(spec, tmp_path / "a")
    state = server.start_state()
    screen = Screen(flower_strategy(spec, None), server, 1)
    screen.round = {"joined": 3, "aggregated": True}
    server.evaluate_round(1, state, screen)
    screen.round = empty
    with pytest.raises(MicrotuneError, match=r"round 2 aggregated no update.*holds round 1"):
        server.evaluate_round(2, state, screen)
    # Allowed: every round logged, but a state no round trained is never written.
    allowed = dataclasses.replace(spec, output_dir=str(tmp_path / "b"), allow_empty_rounds=True)
    (tmp_path / "b").mkdir()
    server = FederationServer(allowed, tmp_path / "b")
    state = server.start_state()
    screen.server = server
    for server_round in (1, 2, 3):
        server.evaluate_round(server_round, state, screen)
    assert not (tmp_path / "b" / CONFIG_FILE).exists()
    with pytest.raises(MicrotuneError, match="no round of 3 aggregated an update; nothing"):
        server.finish()
    assert allowed.record() == spec.record()  # resuming with or without the flag is one run


def test_client_level_delta_must_be_below_one_over_the_parties(
    tiny_model_dirs, toy_files, tmp_path, capsys
):
    spec = spec_for(tiny_model_dirs, toy_files, tmp_path / "x", clients=4, clients_per_round=2)
    with pytest.raises(MicrotuneError, match=r"--client-dp-delta 0.5 is not below 1/--clients"):
        dataclasses.replace(spec, client_dp=ClientDP(8.0, 0.5))
    with pytest.raises(MicrotuneError, match=r"1/--clients = 1/4.*at most 0.125"):
        dataclasses.replace(spec, client_dp=ClientDP(8.0, 0.25))
    assert dataclasses.replace(spec, client_dp=ClientDP(8.0, 0.2)).client_dp.delta == 0.2
