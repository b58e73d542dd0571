"""DP-SGD: exact per-example gradients, calibrated accounting, budget stops, refusals, resume."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from microtune import api
from microtune.backbone.load import load_backbone
from microtune.cli import main
from microtune.common.files import CHECKPOINT_FILE, LOG_FILE
from microtune.errors import MicrotuneError
from microtune.methods import METHODS, build_method, register_method, unregister_method
from microtune.methods.linear import LinearProbe
from microtune.model import HeadConfig, TaskModel
from microtune.privacy.accounting import calibrate_sigma, epsilon_spent
from microtune.privacy.config import DPConfig
from microtune.privacy.dpsgd import DPStep, PoissonSampler, PrivacyPlan
from microtune.privacy.per_example import (
    GhostClipping,
    PerExampleGradients,
    engine_for,
    example_losses,
    loop_gradients,
)
from microtune.tasks.data import collate
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig

from .conftest import tiny_tokenizer

# Different lengths, so the batch is padded: padding must not leak into any example's gradient.
TEXTS = ["the film is good", "a very dull plot , not fun and bad", "love it", "the worst movie"]
LABELS = torch.tensor([1, 0, 1, 0])

PARITY_CASES = [
    ("bert", "slash", {"d": 16}, "substitution"),
    ("bert", "slash", {"d": 16, "memory_lean": True}, "substitution"),
    ("gpt2", "slash", {"d": 16, "position": "attention"}, "substitution"),
    ("bert", "jrwarp", {"d": 16}, "substitution"),
    ("llama", "jrwarp", {"d": 16, "memory_lean": True}, "substitution"),
    ("bert", "lora", {}, "vmap"),
    ("gpt2", "lora", {}, "vmap"),
    ("bert", "bitfit", {}, "ghost"),
    ("gpt2", "full", {}, "ghost"),
    ("bert", "full", {}, "ghost"),
    ("gpt2", "bitfit", {}, "ghost"),
    ("llama", "full", {}, "vmap"),  # RMSNorm is not a ghost layer
    ("bert", "linear", {}, "substitution"),
]
# Methods that landed beside this work go through the general path, unmodified.
PARITY_CASES += [("bert", name, {}, "vmap") for name in ("pafi", "hiwi") if name in METHODS]


def tiny_task_model(model_dir, method, options, readout="mean"):
    torch.manual_seed(0)
    backbone, _ = load_backbone(str(model_dir))
    model = TaskModel(
        backbone, HeadConfig(num_labels=2, readout=readout), build_method(method, options)
    )
    with torch.no_grad():  # away from a zero-initialised start, so every gradient is non-trivial
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def one_at_a_time(model, params, rows, labels):
    """The reference: each example alone, unpadded, one backward pass each."""
    grads = []
    for row, label in zip(rows, labels, strict=True):
        loss = example_losses(model(**collate([row], 0)), label[None]).sum()
        got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for p, g in zip(params.values(), got, strict=True)
                ]
            )
        )
    return torch.stack(grads)


def flat(grads, params):
    return torch.cat([grads[n].flatten(1) for n in params], dim=1)


@pytest.mark.parametrize(("arch", "method", "options", "path"), PARITY_CASES)
def test_per_example_gradients_equal_a_one_example_loop(
    tiny_model_dirs, arch, method, options, path
):
    readout = "mean" if arch == "bert" else "last"
    model = tiny_task_model(tiny_model_dirs[arch], method, options, readout)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = tiny_tokenizer()
    rows = [{k: list(v) for k, v in tokenizer(t).items()} for t in TEXTS]
    engine = engine_for(model, params)
    assert engine.path == path  # the fast path where a method offers one, else ghost or vmap
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a silent fallback to the loop would fail here
        warnings.filterwarnings("ignore", message="There is a performance drop")
        chunks = list(engine(collate(rows, tokenizer.pad_token_id), LABELS))
    losses = torch.cat([c[0] for c in chunks])
    got = torch.cat([flat(c[1], params) for c in chunks])
    expected = one_at_a_time(model, params, rows, LABELS)
    assert losses.shape == (4,)
    relative = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert relative.max() <= 1e-5, relative
    assert expected.norm(dim=1).min() > 0


@pytest.mark.parametrize(("arch", "method"), [("bert", "full"), ("gpt2", "bitfit")])
def test_ghost_clipped_sums_equal_clipping_each_examples_gradient(tiny_model_dirs, arch, method):
    model = tiny_task_model(tiny_model_dirs[arch], method, {}, "mean" if arch == "bert" else "last")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = tiny_tokenizer()
    inputs = collate([{k: list(v) for k, v in tokenizer(t).items()} for t in TEXTS], 0)
    ghost = engine_for(model, params)
    assert isinstance(ghost, GhostClipping)
    grads = flat(loop_gradients(model, params, inputs, LABELS)[1], params)
    clip = float(grads.norm(dim=1).median())  # half the examples clipped, half not
    factors = (clip / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    losses, sums = ghost.clipped_sum(inputs, LABELS, clip)
    got = torch.cat([sums[n].flatten() for n in params])
    expected = (grads * factors).sum(0)
    assert ((got - expected).norm() / expected.norm()) <= 1e-5
    _, through_vmap = ghost.fallback.clipped_sum(inputs, LABELS, clip)
    assert torch.allclose(got, torch.cat([through_vmap[n].flatten() for n in params]), atol=1e-6)


@pytest.mark.parametrize("steps", [3, 40])  # the ghost norm (T² < in·out), and the direct one
def test_a_linear_layers_squared_norms_by_either_route(steps):
    from microtune.privacy.per_example import _per_example_grad, _squared_norm

    layer = torch.nn.Linear(6, 5)
    a, g = torch.randn(4, steps, 6), torch.randn(4, steps, 5)
    direct = _per_example_grad(layer, "weight", a, g).flatten(1).pow(2).sum(1)
    assert torch.allclose(_squared_norm(layer, "weight", a, g), direct, rtol=1e-5)
    loop = torch.stack([(g[b].T @ a[b]).pow(2).sum() for b in range(4)])
    assert torch.allclose(direct, loop, rtol=1e-5)


def test_ghost_falls_back_when_a_layer_is_called_twice():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(self.layer(x))

    torch.manual_seed(0)
    model = Twice()
    params = dict(model.named_parameters())
    inputs = torch.randn(4, 3)
    targets = torch.randn(4, 3)
    losses_of = lambda out, labels, m: (out - labels).pow(2).sum(1)  # noqa: E731
    engine = GhostClipping(model, params)
    with pytest.warns(UserWarning, match="called twice"), pytest.MonkeyPatch.context() as patch:
        patch.setattr("microtune.privacy.per_example.example_losses", losses_of)
        engine.model = lambda **kw: model(kw["x"])
        engine.fallback.model = engine.model
        engine.fallback.path = "loop"
        _, sums = engine.clipped_sum({"x": inputs}, targets, clip=1e9)
    loss = (model(inputs) - targets).pow(2).sum()
    expected = torch.autograd.grad(loss, list(params.values()))
    for got, want in zip(sums.values(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert engine.ghostable is False


def test_the_general_path_agrees_with_the_fast_one(tiny_model_dirs):
    model = tiny_task_model(tiny_model_dirs["bert"], "slash", {"d": 16})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = tiny_tokenizer()
    inputs = collate([{k: list(v) for k, v in tokenizer(t).items()} for t in TEXTS], 0)
    engine = PerExampleGradients(model, params)
    fast = flat(engine.substitution(inputs, LABELS)[1], params)
    general = flat(engine.vmap(inputs, LABELS)[1], params)
    loop = flat(loop_gradients(model, params, inputs, LABELS)[1], params)
    assert torch.allclose(fast, general, rtol=1e-5, atol=1e-7)
    assert torch.allclose(fast, loop, rtol=1e-5, atol=1e-7)


def test_a_dp_step_is_clipped_sum_plus_one_noise_draw_over_the_expected_batch(tiny_model_dirs):
    model = tiny_task_model(tiny_model_dirs["bert"], "slash", {"d": 16})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = tiny_tokenizer()
    inputs = collate([{k: list(v) for k, v in tokenizer(t).items()} for t in TEXTS], 0)
    dp = DPConfig(sigma=0.7, clip=0.01, batch=8, noise_seed=5)
    step = DPStep(PrivacyPlan.resolve(dp, num_examples=80, planned_steps=10))
    step.bind(model, params, TrainConfig(max_steps=10, learning_rate=0.1), 10)
    halves = [
        ({k: v[:2] for k, v in inputs.items()}, LABELS[:2]),
        ({k: v[2:] for k, v in inputs.items()}, LABELS[2:]),
    ]
    step.gradients(model, halves, logical_size=4)

    grads = flat(loop_gradients(model, params, inputs, LABELS)[1], params)
    clipped = grads * (0.01 / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    assert (grads.norm(dim=1) > 0.01).all()  # every example was really clipped
    noise = DPStep(step.plan).noise  # the same seed: the same single draw
    draws = torch.cat([torch.randn(p.shape, generator=noise).flatten() for p in params.values()])
    expected = (clipped.sum(0) + draws * 0.7 * 0.01) / 8  # divided by the expected size q*N
    got = torch.cat([p.grad.flatten() for p in params.values()])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_sigma_reproduces_the_target_epsilon(accountant):
    from opacus.accountants import create_accountant

    q, steps, delta = 0.0304, 640, 7.42e-6  # SST-2, logical batch 2048, 20 epochs
    sigma = calibrate_sigma(8.0, delta, q, steps, accountant)
    account = create_accountant(mechanism=accountant)
    account.history = [(sigma, q, steps)]
    epsilon = account.get_epsilon(delta=delta)
    assert 8.0 * 0.99 <= epsilon <= 8.0
    if accountant == "prv":
        assert sigma == pytest.approx(0.81, abs=0.01)  # methods.md §7's reference


def test_poisson_batches_have_mean_qn_and_are_a_pure_function_of_seed_and_epoch():
    sampler = PoissonSampler(num_examples=1000, expected_batch=50, seed=7)
    assert sampler.batches_per_epoch == 20
    sizes = [len(b) for e in range(10) for b in sampler.epoch(e)]
    # 200 batches of Binomial(1000, 0.05): the mean is 50 with standard error ~0.49.
    assert abs(sum(sizes) / len(sizes) - 50) < 2.5
    assert min(sizes) != max(sizes)  # variable size
    assert sampler.epoch(3) == PoissonSampler(1000, 50, 7).epoch(3)
    assert sampler.epoch(3) != sampler.epoch(4)
    assert sampler.epoch(3) != PoissonSampler(1000, 50, 8).epoch(3)
    batch = sampler.epoch(0)[0]
    assert batch == sorted(set(batch)) and batch[0] >= 0 and batch[-1] < 1000


def dp_run(tmp_path, toy_files, model_dir, name, dp, resume=False, method="slash", **config):
    settings = dict(max_steps=8, batch_size=8, checkpoint_every=3, eval_every=0, seed=3)
    settings.update(progress=False, learning_rate=0.05, warmup_ratio=0.0, log_every=2)
    settings.update(config)
    return api.train(
        "sst2",
        method,
        tmp_path / name,
        method_options={"d": 16} if method == "slash" else {},
        model=str(model_dir),
        data=DataSource(
            train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
        ),
        train_config=TrainConfig(**settings),
        privacy=dp,
        existing="resume" if resume else "refuse",
    )


def test_a_run_whose_budget_runs_out_stops_before_exceeding_it(
    tmp_path, toy_files, tiny_model_dirs
):
    # sigma fixed far below what 40 steps at epsilon 3 need: the budget runs out on the way.
    dp = DPConfig(epsilon=3.0, sigma=0.9, batch=16, accountant="rdp", noise_seed=0)
    report = dp_run(tmp_path, toy_files, tiny_model_dirs["bert"], "budget", dp, max_steps=40)
    steps, record = report["steps"], report["privacy"]
    q, delta = 16 / 96, 1 / (2 * 96)
    assert 0 < steps < 40 and record["steps"] == steps
    assert report["epsilon"] == epsilon_spent(0.9, q, steps, delta, "rdp") <= 3.0
    assert epsilon_spent(0.9, q, steps + 1, delta, "rdp") > 3.0  # one more step would exceed it
    lines = [json.loads(x) for x in (tmp_path / "budget" / LOG_FILE).read_text().splitlines()]
    assert any("privacy budget" in line.get("stopped", "") for line in lines)
    logged = [line["epsilon"] for line in lines if "epsilon" in line]
    assert logged == sorted(logged) and logged[-1] <= 3.0  # ε spent is logged as training goes


class _BatchMixing(LinearProbe):
    """A test-only method that declares its forward mixes examples."""

    name = "batch-mixing"
    supports_per_example = False


def test_a_method_without_per_example_gradients_is_refused_before_training(
    tmp_path, toy_files, tiny_model_dirs, monkeypatch, request
):
    register_method(_BatchMixing.name, _BatchMixing.config_class, _BatchMixing)
    request.addfinalizer(lambda: unregister_method(_BatchMixing.name))
    steps = {"n": 0}
    original = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        steps["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    with pytest.raises(
        MicrotuneError, match="no per-example gradients.*cannot train with differential"
    ):
        dp_run(
            tmp_path,
            toy_files,
            tiny_model_dirs["bert"],
            "refused",
            DPConfig(epsilon=8, batch=16),
            method=_BatchMixing.name,
        )
    assert steps["n"] == 0
    assert not (tmp_path / "refused" / "adapter.safetensors").exists()
    # Without DP the same method trains: the refusal is about privacy only.
    dp_run(tmp_path, toy_files, tiny_model_dirs["bert"], "plain", None, method=_BatchMixing.name)
    assert steps["n"] > 0


def test_resume_of_a_dp_run_is_bit_identical(tmp_path, toy_files, tiny_model_dirs):
    bert = tiny_model_dirs["bert"]
    dp = DPConfig(sigma=1.0, batch=16, accountant="rdp", noise_seed=11)
    whole = dp_run(tmp_path, toy_files, bert, "whole", dp, log_every=8)

    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            dp_run(tmp_path, toy_files, bert, "crashed", dp, log_every=8)
    assert (tmp_path / "crashed" / CHECKPOINT_FILE).is_file()  # written after step 3
    resumed = dp_run(tmp_path, toy_files, bert, "crashed", dp, resume=True, log_every=8)
    a = load_file(tmp_path / "whole" / "adapter.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["privacy"] == whole["privacy"]


def test_a_short_dp_run_through_the_cli_records_its_privacy(
    tmp_path, toy_files, tiny_model_dirs, capsys
):
    out = tmp_path / "cli"
    argv = ["train", "--task", "sst2", "--method", "slash", "--d", "16", "--output", str(out)]
    argv += ["--model", str(tiny_model_dirs["bert"]), "--max-steps", "3", "--batch-size", "8"]
    argv += [
        "--train-file",
        str(toy_files / "train.jsonl"),
        "--dev-file",
        str(toy_files / "dev.jsonl"),
    ]
    argv += [
        "--no-progress",
        "--dp-epsilon",
        "8",
        "--dp-batch",
        "16",
        "--dp-clip",
        "0.5",
        "--dp-accountant",
        "rdp",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    artifact = json.loads((out / "microtune.json").read_text())
    for record in (metrics["privacy"], artifact["privacy"]):
        assert record["delta"] == 1 / (2 * 96) and record["clip"] == 0.5
        assert record["sample_rate"] == 16 / 96 and record["steps"] == 3
        assert record["sampling"] == "poisson" and record["sampling_exact"] is True
        assert record["accountant"] == "rdp" and record["sigma"] > 0
        assert 0 < record["epsilon"] <= 8
    assert metrics["epsilon"] == metrics["privacy"]["epsilon"]


def test_the_accountant_command_and_its_errors(capsys):
    base = ["accountant", "--sample-rate", "0.0304", "--steps", "640", "--delta", "7.42e-6"]
    assert main([*base, "--sigma", "0.81"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(8.0, abs=0.05)
    for bad, message in (
        (["--epsilon", "0"], "epsilon must be positive"),
        (["--epsilon", "8", "--delta", "1"], "delta must be in"),
        (["--epsilon", "8", "--sample-rate", "1.5"], "sample-rate must be in"),
    ):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert main(["train", "--task", "sst2", "--output", "x", "--dp-clip", "2"]) == 2
    assert "--dp-epsilon" in capsys.readouterr().err
